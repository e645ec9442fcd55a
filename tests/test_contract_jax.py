"""The fault contract (tests/contract.py) on the JAX recipes: deit3_jax.py, deit_jax.py, mae_jax.py (3 stages)."""

import pytest
from contract import JAX_RECIPES, ContractTests, data_root, reference, stopped  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def recipes():
    return JAX_RECIPES


@pytest.mark.parametrize("recipe", JAX_RECIPES, ids=lambda r: r.name, scope="class")
class TestJaxRecipes(ContractTests):
    pass
