"""Channel mapper: backbone C2..C5 -> P2..P6, all ``out_channels`` wide."""
import fvcore.nn.weight_init as weight_init
from torch import nn


class ChannelMapper(nn.Module):
    """1x1 conv + GroupNorm (no activation) per input level; the extra level P6 is a 3x3 stride-2
    conv + GroupNorm on the last input (C5).
    """

    def __init__(self, in_channels, out_channels=256, num_extra=1, gn_groups=32):
        """in_channels: list of channels of C2..C5 (fine to coarse)."""
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1), nn.GroupNorm(gn_groups, out_channels))
            for c in in_channels
        )
        self.extra = nn.ModuleList()
        c = in_channels[-1]
        for _ in range(num_extra):
            self.extra.append(nn.Sequential(
                nn.Conv2d(c, out_channels, 3, stride=2, padding=1),
                nn.GroupNorm(gn_groups, out_channels),
            ))
            c = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                weight_init.c2_xavier_fill(m)

    def forward(self, feats):
        """feats: list of [N, C_i, H_i, W_i] (fine to coarse) -> list of [N, out, H_i, W_i],
        len(feats) + num_extra maps."""
        outs = [layer(x) for layer, x in zip(self.lateral, feats)]
        x = feats[-1]
        for layer in self.extra:
            x = layer(x)
            outs.append(x)
        return outs
