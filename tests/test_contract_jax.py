"""The fault contract (tests/contract.py) on the JAX recipes: deit3_jax.py, deit_jax.py, mae_jax.py (3 stages)."""

import pytest
from contract import JAX_RECIPES, ContractTests, make_jpeg_folder, reference, stopped  # noqa: F401


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(scope="module")
def recipes():
    return JAX_RECIPES


@pytest.mark.parametrize("recipe", JAX_RECIPES, ids=lambda r: r.name, scope="class")
class TestJaxRecipes(ContractTests):
    pass
