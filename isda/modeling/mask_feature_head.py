"""SOLOv2-style mask-feature head: fuses P2..P5 (or P3..P5) into one map F."""
import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F


def coord_channels(x):
    """Normalised (x, y) coordinates in [-1, 1] of every pixel of ``x`` [N, C, H, W] ->
    [N, 2, H, W]."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy])[None].expand(n, -1, -1, -1)


def _conv_gn_relu(cin, cout, k, gn_groups):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    weight_init.c2_msra_fill(conv)
    return [conv, nn.GroupNorm(gn_groups, cout), nn.ReLU(inplace=True)]


def _up():
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)


class MaskFeatureHead(nn.Module):
    """Mask feature representation F at ``out_stride`` (8, 4 or 2).

    Inputs are P2..P5 (strides 4..32). The branch of the level at stride ``s`` applies
    ``log2(s / base)`` rounds of [3x3 conv, GN, ReLU, 2x bilinear upsample] (the base level: one
    [3x3 conv, GN, ReLU]); ``base`` is 8 for ``out_stride`` 8 (P2 unused), else 4. With
    ``coords`` ("MP") the P5 branch reads P5 concatenated with 2 coordinate channels. The branch
    outputs are summed; for ``out_stride`` 2 one more round runs on the sum; finally a 1x1 conv
    + GN + ReLU maps to ``out_channels``.
    """

    def __init__(self, in_channels=256, feat_channels=128, out_channels=256, out_stride=4,
                 coords=True, gn_groups=32):
        super().__init__()
        if out_stride not in (8, 4, 2):
            raise ValueError(f"MASK_STRIDE must be 8, 4 or 2, got {out_stride}")
        self.out_stride = out_stride
        self.coords = coords
        base = 8 if out_stride == 8 else 4
        self.in_strides = [s for s in (4, 8, 16, 32) if s >= base]
        self.branches = nn.ModuleList()
        for s in self.in_strides:
            rounds = (s // base).bit_length() - 1
            cin = in_channels + (2 if (coords and s == 32) else 0)
            layers = _conv_gn_relu(cin, feat_channels, 3, gn_groups)
            if rounds > 0:
                layers.append(_up())
            for _ in range(rounds - 1):
                layers += _conv_gn_relu(feat_channels, feat_channels, 3, gn_groups) + [_up()]
            self.branches.append(nn.Sequential(*layers))
        self.extra = (nn.Sequential(*_conv_gn_relu(feat_channels, feat_channels, 3, gn_groups), _up())
                      if out_stride == 2 else None)
        self.output = nn.Sequential(*_conv_gn_relu(feat_channels, out_channels, 1, gn_groups))

    def forward(self, feats):
        """feats: dict stride -> [N, C, H_s, W_s] for strides 4, 8, 16, 32 (4 unused at stride
        8) -> F [N, out_channels, H/out_stride, W/out_stride]."""
        out = None
        for s, branch in zip(self.in_strides, self.branches):
            x = feats[s]
            if self.coords and s == 32:
                x = torch.cat([x, coord_channels(x)], dim=1)
            y = branch(x)
            if out is None:
                out = y
            else:
                if y.shape[-2:] != out.shape[-2:]:  # inputs not padded to a multiple of 32
                    y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
                out = out + y
        if self.extra is not None:
            out = self.extra(out)
        return self.output(out)
