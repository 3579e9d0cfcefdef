"""Ground-truth masks on the mask grid: the training targets of the mask losses and matching."""
import torch

__all__ = ["soft_masks_on_grid"]


def soft_masks_on_grid(masks: torch.Tensor, grid_shape, stride: int) -> torch.Tensor:
    """Full-resolution masks -> soft masks on the mask grid, exactly the values of zero-padding
    them to ``grid * stride`` and bilinearly resizing to ``grid`` (``align_corners=False``).

    At an integer scale ``stride`` that resize samples each output pixel at input coordinate
    ``stride * i + (stride - 1) / 2``: the mean of the 2 x 2 pixels ``stride * i + stride/2 - 1``
    and ``+ stride/2`` for an even stride, the one pixel ``stride * i + (stride - 1) / 2`` for an
    odd one. Those pixels are read directly from strided views, so no full-resolution float copy
    (nor its padding) is ever made; pixels beyond the masks' size are the zero padding.

    masks: [G, H, W] (bool, uint8 or float) with H, W <= grid * stride; grid_shape: (h, w)
    -> float32 [G, h, w]."""
    h, w = grid_shape
    g, height, width = masks.shape
    if height > h * stride or width > w * stride:
        raise ValueError(f"masks of {height}x{width} do not fit the {h}x{w} grid at stride {stride}")
    offsets = (stride // 2 - 1, stride // 2) if stride % 2 == 0 else ((stride - 1) // 2,)
    out = torch.zeros(g, h, w, dtype=torch.float32, device=masks.device)
    if g == 0:
        return out
    for dy in offsets:
        for dx in offsets:
            part = masks[:, dy::stride, dx::stride]
            out[:, :part.shape[1], :part.shape[2]] += part
    return out.mul_(1.0 / len(offsets) ** 2)
