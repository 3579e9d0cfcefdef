"""``ExportableISDA``: a built ISDA model as one traceable function of the image.

Graph contract (one image, any height and width >= :data:`MIN_SIZE`):

input
    ``image``: float32 ``[1, 3, H, W]``, pixel values 0..255 in the model's ``INPUT.FORMAT``
    channel order (RGB for the shipped configs), already resized (``ResizeShortestEdge`` of the
    config stays outside the graph, as in ``ISDAPredictor``). Normalisation by
    ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` and the zero padding to a multiple of 32 happen **inside**
    the graph.
outputs
    ``scores``: float32 ``[T]``, the sigmoid class scores of the top-T (query, class) pairs of the
    last decoder layer, sorted in decreasing order (T = ``min(TEST.TOPK, queries x classes)``);
    ``classes``: int64 ``[T]``, their class indices;
    ``mask_logits``: float32 ``[T, Hp / s, Wp / s]``, their mask logits on the padded mask grid
    (``Hp, Wp`` = H, W rounded up to multiples of 32, ``s`` = ``MASK_STRIDE``).

What the graph runs is the model's own inference up to the top-k selection: backbone ->
channel mapper -> deformable encoder -> decoder -> class / kernel heads -> top-k -> dynamic 1x1
mask convolution, with the same parameters. The rest of ``isda.modeling.postprocess`` (mask
scores, final sort, the optional duplicate removal ``TEST.DEDUP``, upsampling, crop, resize to
the original size, thresholding, boxes) is :func:`isda.export.postprocess.outputs_to_instances`,
outside the graph.

Differences from the normal forward, none of which changes the function computed:

* the deformable attention as grid_sample with the level sizes read from the feature maps'
  (symbolic) shapes (:mod:`isda.export.attention`);
* the padding mask is always applied (the normal forward skips it when nothing is padded,
  which masks nothing either);
* ``torch.linspace`` of the coordinate channels and encoder reference points is written with
  ``arange`` (same formula; ``linspace`` with a symbolic length does not export);
* the backbone input stays in the contiguous layout (the CPU model uses channels-last);
* the top-k is sorted (the normal forward's is not; the post-processing sorts anyway).

Results agree with the normal model to float rounding (``tests/export/test_export.py``).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.ms_deform_attn import MSDeformAttn
from ..modeling.deformable_encoder import encoder_reference_points
from ..modeling.meta_arch import SIZE_DIVISIBILITY, level_tokens, pyramid
from .attention import ExportMSDeformAttn

__all__ = ["ExportableISDA", "MIN_SIZE", "export_linspace", "INPUT_NAMES", "OUTPUT_NAMES"]

#: The smallest height / width a graph exported with dynamic sizes accepts. Tracing with
#: symbolic sizes assumes no dimension equals 1 (it would broadcast): the coarsest level P6
#: (stride 64 of the padded image) must be >= 2, i.e. the padded side >= 96, the side >= 65.
MIN_SIZE = 2 * 32 + 1
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["scores", "classes", "mask_logits"]


def export_linspace(start: float, end: float, steps, like: torch.Tensor) -> torch.Tensor:
    """``torch.linspace(start, end, steps)`` for a possibly symbolic ``steps`` >= 2, from
    ``arange`` (torch's CPU formula: ``start + step * i`` in the first half,
    ``end - step * (steps - 1 - i)`` in the second, ``step = (end - start) / (steps - 1)``)."""
    i = torch.arange(steps, device=like.device, dtype=like.dtype)
    last = torch.scalar_tensor(steps - 1, dtype=like.dtype, device=like.device)
    step = (end - start) / last
    half = torch.scalar_tensor(steps // 2, dtype=like.dtype, device=like.device)
    return torch.where(i < half, start + step * i, end - step * (last - i))


def _coord_channels(x):
    """``isda.modeling.mask_feature_head.coord_channels`` with :func:`export_linspace`."""
    n, _, h, w = x.shape
    ys = export_linspace(-1.0, 1.0, h, x)
    xs = export_linspace(-1.0, 1.0, w, x)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy])[None].expand(n, -1, -1, -1)


def _swap_attention(module: nn.Module) -> None:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MSDeformAttn):
                setattr(parent, name, ExportMSDeformAttn.from_module(child))


class ExportableISDA(nn.Module):
    """Wraps a built ``ISDA`` model (a copy, eval mode) as
    ``image [1, 3, H, W] -> (scores [T], classes [T], mask_logits [T, Hp/s, Wp/s])``.

    Args:
        model: an ``isda.modeling.ISDA`` (weights loaded); not modified.
        topk: pairs kept (default: the model's ``TEST.TOPK``), capped at queries x classes.
    """

    def __init__(self, model: nn.Module, topk: int = None):
        super().__init__()
        plain = copy.deepcopy(model).eval()
        _swap_attention(plain)
        self.backbone = plain.backbone
        self.mapper = plain.mapper
        self.encoder = plain.encoder
        self.decoder = plain.decoder
        self.query_selection = getattr(plain, "query_selection", None)
        self.mask_head = plain.mask_head
        self.heads = plain.heads
        self.position_embedding = plain.position_embedding
        self.level_embed = plain.level_embed
        self.register_buffer("pixel_mean", plain.pixel_mean.clone(), False)
        self.register_buffer("pixel_std", plain.pixel_std.clone(), False)
        self.in_features = list(plain.in_features)
        self.mask_stride = plain.mask_stride
        self.mask_feature_source = plain.mask_feature_source
        self.mask_threshold = plain.mask_threshold
        # duplicate removal (TEST.DEDUP) is a post-processing step outside the graph
        self.dedup = getattr(plain, "dedup", "none")
        self.dedup_iou = getattr(plain, "dedup_iou", 0.5)
        self.dedup_sigma = getattr(plain, "dedup_sigma", 2.0)
        num_queries = plain.decoder.num_queries
        self.num_classes = plain.heads.class_embed.out_features
        self.topk = min(int(topk if topk is not None else plain.test_topk),
                        num_queries * self.num_classes)
        self.eval()

    # ------------------------------------------------------------------ stages
    def _neck(self, image):
        h, w = image.shape[-2:]
        hp = (h + SIZE_DIVISIBILITY - 1) // SIZE_DIVISIBILITY * SIZE_DIVISIBILITY
        wp = (w + SIZE_DIVISIBILITY - 1) // SIZE_DIVISIBILITY * SIZE_DIVISIBILITY
        x = (image.float() - self.pixel_mean) / self.pixel_std
        x = F.pad(x, (0, wp - w, 0, hp - h))  # zeros after normalisation, as ImageList pads
        device = image.device
        pad_mask = ((torch.arange(hp, device=device) >= h)[:, None]
                    | (torch.arange(wp, device=device) >= w)[None, :])[None]  # [1, Hp, Wp]
        return pyramid(self.backbone, self.mapper, self.in_features, x, pad_mask)

    def _flatten(self, maps, masks):
        """The model's tokens with the level sizes as a list (symbolic sizes when exported)."""
        return level_tokens(maps, masks, self.position_embedding, self.level_embed)

    def _mask_features(self, feats):
        """``MaskFeatureHead.forward`` with export-friendly coordinate channels (the inputs are
        padded to a multiple of 32, so every branch ends at the same size)."""
        head = self.mask_head
        out = None
        for s, branch in zip(head.in_strides, head.branches):
            x = feats[s]
            if head.coords and s == 32:
                x = torch.cat([x, _coord_channels(x)], dim=1)
            y = branch(x)
            out = y if out is None else out + y
        if head.extra is not None:
            out = head.extra(out)
        return head.output(out)

    # ------------------------------------------------------------------ forward
    def forward(self, image):
        """image [1, 3, H, W] float (0..255, ``INPUT.FORMAT`` order) -> (scores [T], classes [T]
        int64, mask_logits [T, Hp/s, Wp/s])."""
        maps, masks = self._neck(image)
        levels = (8, 16, 32, 64)
        src, pos, token_mask, shapes, ratios = self._flatten([maps[s] for s in levels],
                                                             [masks[s] for s in levels])
        reference_points = encoder_reference_points(shapes, ratios)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, pos, reference_points, shapes, None, token_mask)
        proposals = None
        if self.query_selection is not None:  # MODEL.ISDA.TWO_STAGE
            proposals = self.query_selection(memory, token_mask, shapes, ratios)
        hs, ref = self.decoder(memory, shapes, None, ratios, token_mask, proposals)
        if self.mask_feature_source == "encoder":
            n, _, c = memory.shape
            parts = memory.split([h * w for h, w in shapes], 1)
            enc = [t.transpose(1, 2).reshape(n, c, h, w) for t, (h, w) in zip(parts, shapes)]
            mask_in = {4: maps.get(4), 8: enc[0], 16: enc[1], 32: enc[2]}
        else:
            mask_in = {s: maps.get(s) for s in (4, 8, 16, 32)}
        mask_features = self._mask_features(mask_in)  # [1, D, Hp/s, Wp/s]
        logits, kernels = self.heads(hs[-1], ref)  # [1, Q, K], [1, Q, D]
        # isda.modeling.postprocess.select_topk, sorted
        num_classes = logits.shape[-1]
        scores, idx = logits[0].float().sigmoid().flatten().topk(self.topk)
        query_idx = torch.div(idx, num_classes, rounding_mode="floor")
        classes = idx % num_classes
        _, d, mh, mw = mask_features.shape
        mask_logits = torch.matmul(kernels[0, query_idx], mask_features[0].reshape(d, mh * mw))
        return scores, classes, mask_logits.reshape(self.topk, mh, mw)
