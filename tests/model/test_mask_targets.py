"""Soft training targets on the mask grid against their definition: zero-pad the full-resolution
masks to grid x stride and resize bilinearly (float64 ``F.interpolate``, align_corners=False)."""
import pytest
import torch
import torch.nn.functional as F

from isda.modeling.mask_targets import soft_masks_on_grid


def reference(masks, grid, stride):
    h, w = grid
    padded = F.pad(masks.double(), (0, w * stride - masks.shape[2], 0, h * stride - masks.shape[1]))
    return F.interpolate(padded[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("stride", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32])
def test_equals_padded_bilinear_resize(stride, dtype):
    g = torch.Generator().manual_seed(stride)
    height, width = 61, 45  # not multiples of the stride: partial blocks at the borders
    grid = (-(-height // stride) + 1, -(-width // stride))  # one extra padded row of the grid
    masks = torch.rand(5, height, width, generator=g) > 0.6
    if dtype is torch.float32:  # soft masks also work (any values)
        masks = torch.rand(5, height, width, generator=g)
    else:
        masks = masks.to(dtype)
    got = soft_masks_on_grid(masks, grid, stride)
    assert got.dtype == torch.float32 and got.shape == (5, *grid)
    torch.testing.assert_close(got.double(), reference(masks, grid, stride), rtol=0, atol=1e-6)


def test_hand_computed_stride_4():
    m = torch.zeros(1, 8, 4, dtype=torch.bool)
    m[0, 1, 1] = m[0, 2, 2] = True  # two of the four pixels block (0, 0) is sampled at
    m[0, 0, 0] = m[0, 3, 3] = True  # pixels no output samples at stride 4
    m[0, 6, 1] = True  # one of the four of block (1, 0)
    got = soft_masks_on_grid(m, (2, 1), 4)
    assert got[0].tolist() == [[0.5], [0.25]]


def test_no_instances_and_masks_larger_than_the_grid():
    assert soft_masks_on_grid(torch.zeros(0, 30, 20, dtype=torch.bool), (8, 5), 4).shape == (0, 8, 5)
    with pytest.raises(ValueError, match="do not fit"):
        soft_masks_on_grid(torch.zeros(1, 33, 20, dtype=torch.bool), (8, 5), 4)
