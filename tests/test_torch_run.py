"""common.torch_run fast paths that must not change CPU runs: compile only on CUDA by default, cached constants."""

import numpy as np
import pytest
import torch

from common import gpu_input
from common import torch_run as tr


@pytest.mark.parametrize("flag,device,expected", [
    (None, "cuda", True), (None, "cpu", False), (False, "cuda", False), (True, "cpu", True)])
def test_compile_is_on_by_default_with_cuda_only_and_the_flag_wins(flag, device, expected):
    assert tr.wants_compile(flag, torch.device(device)) is expected, f"--compile {flag} on {device}"


def test_images_to_device_normalises_as_before_and_makes_its_constants_once():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = tr.images_to_device(images, torch.device("cpu"), mean, std)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    want = (x - torch.tensor(mean).view(1, -1, 1, 1) * 255.0) / (torch.tensor(std).view(1, -1, 1, 1) * 255.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    first = gpu_input.normalisation_constants(torch.device("cpu"), mean, std)
    tr.images_to_device(images, torch.device("cpu"), mean, std)
    assert gpu_input.normalisation_constants(torch.device("cpu"), mean, std)[0] is first[0], "constants made again"


def test_per_sample_erasing_is_the_same_whatever_the_split():
    """tr.erase_per_sample: image g of the global batch is erased under (seed, step, g), so two shards of 4 erased
    apart equal the batch of 8 erased at once; about `probability` of the images change, and another step erases
    others."""
    batch = torch.randn(8, 3, 16, 16)
    whole = batch.clone()
    tr.erase_per_sample(whole, 0.5, seed=1, step=3, first_index=0)
    shards = [batch[:4].clone(), batch[4:].clone()]
    tr.erase_per_sample(shards[0], 0.5, seed=1, step=3, first_index=0)
    tr.erase_per_sample(shards[1], 0.5, seed=1, step=3, first_index=4)
    torch.testing.assert_close(torch.cat(shards), whole, rtol=0, atol=0)
    changed = [(whole[i] != batch[i]).any().item() for i in range(8)]
    assert 0 < sum(changed) < 8, changed
    many = torch.randn(400, 3, 8, 8)
    erased = many.clone()
    tr.erase_per_sample(erased, 0.25, seed=0, step=0, first_index=0)
    share = (erased != many).flatten(1).any(1).float().mean().item()
    assert 0.18 < share < 0.32, share
    other_step = batch.clone()
    tr.erase_per_sample(other_step, 0.5, seed=1, step=4, first_index=0)
    assert not torch.equal(other_step, whole)
