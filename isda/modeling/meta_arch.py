"""The ISDA meta-architecture: backbone -> channel mapper -> deformable transformer -> per-query
class logits and dynamic mask kernels applied to a SOLOv2-style mask feature map."""
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, ImageList

from .channel_mapper import ChannelMapper
from .criterion import SetCriterion, check_finite
from .deformable_decoder import DeformableDecoder
from .deformable_encoder import DeformableEncoder, token_centres
from .dense_supervision import DenseCriterion
from .heads import ISDAHeads, predict_masks
from .mask_feature_head import MaskFeatureHead
from .mask_targets import soft_masks_on_grid
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .dedup import check_dedup
from .postprocess import MAX_MASK_BYTES, instances_from_topk, prefers_channels_last, select_topk
from .query_selection import QuerySelection, TokenHead

SIZE_DIVISIBILITY = 32


def _reset_transformer_parameters(module):
    """Deformable DETR's init: xavier on every matrix, then the attention op's own init."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in module.modules():
        reset = getattr(m, "_reset_parameters", None)
        if reset is not None and not isinstance(m, nn.MultiheadAttention):
            reset()


def pyramid(backbone, mapper, in_features, images, pad_mask):
    """Backbone and channel mapper: images [N, 3, Hp, Wp], padding mask [N, Hp, Wp] -> dicts
    stride -> P_l [N, C, H_l, W_l] and stride -> padding mask [N, H_l, W_l]."""
    feats = backbone(images)
    maps = mapper([feats[f] for f in in_features])
    strides = [4, 8, 16, 32, 64][-len(maps):]
    masks = [F.interpolate(pad_mask[None].float(), size=m.shape[-2:])[0].bool() for m in maps]
    return dict(zip(strides, maps)), dict(zip(strides, masks))


def level_tokens(maps, masks, position_embedding, level_embed):
    """Feature maps [N, C, H_l, W_l] and padding masks [N, H_l, W_l] of the transformer levels ->
    (tokens [N, S, C], positions + level embedding [N, S, C], padding mask [N, S],
    [(H_l, W_l)], valid ratios [N, L, 2] (x, y))."""
    srcs, poss, pmasks, shapes, ratios = [], [], [], [], []
    for lvl, (x, m) in enumerate(zip(maps, masks)):
        h, w = x.shape[-2:]
        shapes.append((h, w))
        pos = position_embedding(m).to(x.dtype)
        srcs.append(x.flatten(2).transpose(1, 2))
        poss.append(pos.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1))
        pmasks.append(m.flatten(1))
        valid_h = (~m[:, :, 0]).sum(1).float() / h
        valid_w = (~m[:, 0, :]).sum(1).float() / w
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return (torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(pmasks, 1), shapes,
            torch.stack(ratios, 1))


@META_ARCH_REGISTRY.register()
class ISDA(nn.Module):
    """ISDA instance segmentation (NMS-free set prediction with position-aware mask kernels).

    Input: list of Detectron2 dataset dicts with "image" ([3, H, W] in ``INPUT.FORMAT``), plus
    "instances" (gt_classes, gt_masks) in training and optional "height"/"width" at test time.
    Training returns a dict of losses; inference a list of {"instances": Instances} at the
    original image size.
    """

    @configurable
    def __init__(self, *, backbone, in_features, mapper, encoder, decoder, mask_head, heads,
                 criterion, num_feature_levels, hidden_dim, mask_stride, mask_feature_source,
                 pixel_mean, pixel_std, test_topk=100, mask_threshold=0.5, chunk_pixels=1 << 25,
                 test_precision="fp32", query_selection=None, dense_criterion=None,
                 dense_head=None, score_threshold=0.0, max_mask_bytes=MAX_MASK_BYTES,
                 dedup="none", dedup_iou=0.5, dedup_sigma=2.0):
        """``test_precision`` (``MODEL.ISDA.TEST.PRECISION``): "fp32", or "bf16" to run inference
        up to the mask features under bf16 autocast (post-processing stays fp32).
        ``dense_criterion`` (``MODEL.ISDA.DENSE_LOSS_WEIGHT`` > 0, training only): the dense
        supervision of the encoder tokens, through ``query_selection``'s token heads or, without
        two-stage, ``dense_head``. ``dedup``, ``dedup_iou``, ``dedup_sigma``
        (``MODEL.ISDA.TEST.DEDUP*``): optional duplicate removal (:mod:`isda.modeling.dedup`)."""
        super().__init__()
        if test_precision not in ("fp32", "bf16"):
            raise ValueError(f"MODEL.ISDA.TEST.PRECISION must be fp32 or bf16, got {test_precision!r}")
        self.test_precision = test_precision
        self.backbone = backbone
        self.in_features = in_features
        self.mapper = mapper
        self.encoder = encoder
        self.decoder = decoder
        self.mask_head = mask_head
        self.heads = heads
        # encoder proposals placing the queries (MODEL.ISDA.TWO_STAGE), or None: learned points
        self.query_selection = query_selection
        self.criterion = criterion
        self.dense_criterion = dense_criterion
        self.dense_head = dense_head
        if dense_criterion is not None and query_selection is None and dense_head is None:
            raise ValueError("dense supervision needs token heads (dense_head or query_selection)")
        self.num_feature_levels = num_feature_levels
        self.mask_stride = mask_stride
        self.mask_feature_source = mask_feature_source
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, hidden_dim))
        nn.init.normal_(self.level_embed)
        self.test_topk = test_topk
        self.mask_threshold = mask_threshold
        self.chunk_pixels = chunk_pixels
        # inference memory (MODEL.ISDA.TEST.SCORE_THRESHOLD / MAX_MASK_BYTES): full-size masks
        # only for instances scoring at least score_threshold, and at most max_mask_bytes of them
        self.score_threshold = float(score_threshold)
        self.max_mask_bytes = int(max_mask_bytes) if max_mask_bytes else None
        self.dedup = check_dedup(dedup)
        self.dedup_iou = float(dedup_iou)
        self.dedup_sigma = float(dedup_sigma)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.ISDA
        if c.MASK_FEATURE_SOURCE not in ("mapper", "encoder"):
            raise ValueError(f"MASK_FEATURE_SOURCE must be mapper/encoder, got {c.MASK_FEATURE_SOURCE}")
        if c.NUM_FEATURE_LEVELS != 4:
            raise ValueError("ISDA uses 4 transformer levels (P3..P6)")
        backbone = build_backbone(cfg)
        # P2 only feeds the mask-feature head, which does not read it at stride 8
        in_features = (["res3", "res4", "res5"] if c.MASK_STRIDE == 8
                       else ["res2", "res3", "res4", "res5"])
        shapes = backbone.output_shape()
        mapper = ChannelMapper([shapes[f].channels for f in in_features], c.HIDDEN_DIM,
                               num_extra=1, gn_groups=c.GN_GROUPS)
        layer_kwargs = dict(d_model=c.HIDDEN_DIM, d_ffn=c.DIM_FEEDFORWARD, dropout=c.DROPOUT,
                            n_levels=c.NUM_FEATURE_LEVELS, n_heads=c.NHEADS, n_points=c.NUM_POINTS)
        encoder = DeformableEncoder(c.ENC_LAYERS, checkpoint=c.ENCODER_CHECKPOINT, **layer_kwargs)
        layer_kwargs.pop("d_model")
        decoder = DeformableDecoder(c.NUM_QUERIES, c.DEC_LAYERS, c.HIDDEN_DIM,
                                    aux_groups=c.AUX_GROUPS, two_stage=c.TWO_STAGE, **layer_kwargs)
        query_selection = (QuerySelection(c.HIDDEN_DIM, c.NUM_CLASSES, c.MASK_OUT_DIM,
                                          c.KERNEL_REF_POINTS, c.NUM_QUERIES)
                           if c.TWO_STAGE else None)
        _reset_transformer_parameters(encoder)
        _reset_transformer_parameters(decoder.layers)
        mask_head = MaskFeatureHead(c.HIDDEN_DIM, c.MASK_FEATURE_DIM, c.MASK_OUT_DIM, c.MASK_STRIDE,
                                    coords=c.MASK_COORDS, gn_groups=c.GN_GROUPS)
        heads = ISDAHeads(c.HIDDEN_DIM, c.NUM_CLASSES, c.MASK_OUT_DIM, c.KERNEL_REF_POINTS)
        matcher = HungarianMatcher(c.COST_CLASS, c.COST_MASK, c.FOCAL_ALPHA, c.FOCAL_GAMMA)
        criterion = SetCriterion(c.NUM_CLASSES, matcher, c.FOCAL_WEIGHT, c.DICE_WEIGHT,
                                 c.FOCAL_ALPHA, c.FOCAL_GAMMA, c.DEEP_SUPERVISION,
                                 num_queries=c.NUM_QUERIES, aux_groups=c.AUX_GROUPS,
                                 aux_repeats=c.AUX_GROUP_REPEATS, aux_weight=c.AUX_LOSS_WEIGHT)
        dense_criterion = dense_head = None
        if c.DENSE_LOSS_WEIGHT > 0:
            dense_criterion = DenseCriterion(c.DENSE_LOSS_WEIGHT, c.FOCAL_WEIGHT, c.DICE_WEIGHT,
                                             c.FOCAL_ALPHA, c.FOCAL_GAMMA, c.DENSE_CENTRE_RADIUS)
            if not c.TWO_STAGE:
                dense_head = TokenHead(c.HIDDEN_DIM, c.NUM_CLASSES, c.MASK_OUT_DIM,
                                       c.KERNEL_REF_POINTS)
        elif c.DENSE_LOSS_WEIGHT < 0:
            raise ValueError(f"MODEL.ISDA.DENSE_LOSS_WEIGHT must be >= 0, got {c.DENSE_LOSS_WEIGHT}")
        return {
            "dense_criterion": dense_criterion, "dense_head": dense_head,
            "backbone": backbone, "in_features": in_features, "mapper": mapper,
            "encoder": encoder, "decoder": decoder, "mask_head": mask_head, "heads": heads,
            "criterion": criterion, "num_feature_levels": c.NUM_FEATURE_LEVELS,
            "hidden_dim": c.HIDDEN_DIM, "mask_stride": c.MASK_STRIDE,
            "mask_feature_source": c.MASK_FEATURE_SOURCE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_topk": c.TEST.TOPK, "mask_threshold": c.TEST.MASK_THRESHOLD,
            "chunk_pixels": c.TEST.CHUNK_PIXELS, "test_precision": c.TEST.PRECISION,
            "score_threshold": c.TEST.get("SCORE_THRESHOLD", 0.0),
            "max_mask_bytes": c.TEST.get("MAX_MASK_BYTES", MAX_MASK_BYTES),
            "dedup": c.TEST.DEDUP, "dedup_iou": c.TEST.DEDUP_IOU,
            "dedup_sigma": c.TEST.DEDUP_SIGMA,
            "query_selection": query_selection,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ stages
    def preprocess_image(self, batched_inputs):
        """Normalise and pad to a multiple of 32 -> (ImageList, padding mask [N, Hp, Wp] bool)."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        images = ImageList.from_tensors(images, SIZE_DIVISIBILITY)
        n, _, hp, wp = images.tensor.shape
        mask = torch.ones(n, hp, wp, dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, :h, :w] = False
        return images, mask

    def neck(self, images, pad_mask):
        """-> dicts stride -> P_l [N, C, H_l, W_l] (P2..P6; P3..P6 at mask stride 8) and
        stride -> padding mask [N, H_l, W_l]."""
        # channels-last on the CPU: the oneDNN convolutions of the backbone, mapper and mask head
        # run about 1.5x faster, and flattening a channels-last map to tokens is a free view.
        # CUDA keeps the natural layout (prefers_channels_last)
        if prefers_channels_last(images.device):
            images = images.contiguous(memory_format=torch.channels_last)
        return pyramid(self.backbone, self.mapper, self.in_features, images, pad_mask)

    def flatten_levels(self, maps, masks):
        """P3..P6 -> flattened tokens for the transformer: src, pos (+ level embedding) [N, S, C],
        padding mask [N, S], spatial_shapes [L, 2], level_start_index [L], valid_ratios [N, L, 2]."""
        src, pos, token_mask, shapes, ratios = level_tokens(maps, masks, self.position_embedding,
                                                            self.level_embed)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=self.device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        return src, pos, token_mask, spatial_shapes, level_start_index, ratios

    def forward_features(self, batched_inputs, keep_maps=True):
        """Run everything up to the per-layer predictions.

        Returns a dict with images (ImageList), class logits [layers, N, Q, K], kernels
        [layers, N, Q, D], reference points [N, Q, 2], mask features [N, D, Hp/s, Wp/s] and the
        intermediate maps (dict stride -> P_l) and encoder memory (for inspection).
        ``keep_maps`` False (inference): the stride-4 map is dropped from ``maps`` once the
        mask-feature head has read it, which then runs before the transformer."""
        images, pad_mask = self.preprocess_image(batched_inputs)
        maps, masks = self.neck(images.tensor, pad_mask)
        mask_features = None
        if self.mask_feature_source != "encoder":
            # (independent of the transformer: computed first, so that the stride-4 map can go
            # before the transformer runs when it is not kept)
            mask_features = self.mask_head({s: maps.get(s) for s in (4, 8, 16, 32)})
            if not keep_maps:
                maps.pop(4, None)
        levels = (8, 16, 32, 64)
        src, pos, token_mask, shapes, start, ratios = self.flatten_levels(
            [maps[s] for s in levels], [masks[s] for s in levels])
        # no padding anywhere (e.g. one image, or same-size images): skip the attention's masking
        attn_mask = token_mask if bool(token_mask.any()) else None
        memory = self.encoder(src, pos, shapes, start, ratios, attn_mask)
        del src, pos  # (the encoder's inputs; kept by autograd when training)
        proposals = None
        if self.query_selection is not None:
            proposals = self.query_selection(memory, attn_mask, shapes, ratios)
        hs, ref = self.decoder(memory, shapes, start, ratios, attn_mask, proposals)

        if mask_features is None:  # MASK_FEATURE_SOURCE "encoder"
            n, _, c = memory.shape
            enc_maps = [t.transpose(1, 2).reshape(n, c, h, w)
                        for t, (h, w) in zip(memory.split(shapes.prod(1).tolist(), 1), shapes.tolist())]
            mask_features = self.mask_head({4: maps.get(4), 8: enc_maps[0], 16: enc_maps[1],
                                            32: enc_maps[2]})
        logits, kernels = self.heads(hs, ref)
        return {"images": images, "maps": maps, "memory": memory, "hs": hs, "logits": logits,
                "kernels": kernels, "reference_points": ref, "mask_features": mask_features,
                "proposals": proposals, "levels": (shapes, ratios, token_mask)}

    def prepare_targets(self, batched_inputs, mask_shape):
        """GT masks padded to the padded input size and bilinearly downsampled by the mask
        stride (soft targets on the mask grid ``mask_shape`` (h, w); read from the strided
        pixels the resize samples: :func:`soft_masks_on_grid`)."""
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            gt = inst.gt_masks
            gt = gt.tensor if isinstance(gt, BitMasks) else torch.as_tensor(gt)
            soft = soft_masks_on_grid(gt, mask_shape, self.mask_stride)
            targets.append({"labels": inst.gt_classes.long(), "masks": soft})
        return targets

    def dense_losses(self, out, targets):
        """The dense supervision of the encoder tokens (``MODEL.ISDA.DENSE_LOSS_WEIGHT``)."""
        shapes, ratios, token_mask = out["levels"]
        if self.dense_head is not None:
            tokens, heads = self.dense_head(out["memory"]), self.dense_head.heads
        else:
            tokens, heads = out["proposals"]["tokens"], self.query_selection.heads
        centres = token_centres(shapes, ratios).clamp(0, 1)
        return self.dense_criterion(tokens, heads, centres, token_mask, shapes,
                                    out["mask_features"], targets, self.mask_stride)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs):
        if not self.training and self.test_precision == "bf16":
            # TEST.PRECISION bf16: backbone, mapper and encoder under bf16 autocast (oneDNN's
            # bf16 kernels on the CPU); the decoder, the heads and the mask-feature head, whose
            # outputs meet in the mask product, stay fp32 (isda/layers/mixed_precision.py), as
            # do the mask product and the post-processing below
            from ..layers.mixed_precision import bf16_autocast

            with bf16_autocast(self.device.type, (self.decoder, self.heads, self.mask_head)):
                out = self.forward_features(batched_inputs, keep_maps=False)
        else:
            out = self.forward_features(batched_inputs, keep_maps=self.training)
        mask_features = out["mask_features"]
        if self.training:
            targets = self.prepare_targets(batched_inputs, mask_features.shape[-2:])
            # mask logits are computed inside, with gradient only for the matched queries
            proposals = out["proposals"]
            losses = self.criterion(out["logits"], out["kernels"], mask_features, targets,
                                    None if proposals is None else
                                    (proposals["logits"], proposals["kernels"]))
            if self.dense_criterion is not None:
                losses.update(self.dense_losses(out, targets))
            return losses

        logits, kernels = out["logits"][-1].float(), out["kernels"][-1].float()
        mask_features = mask_features.float()  # no-ops in fp32
        image_sizes = out["images"].image_sizes
        # the backbone maps, the encoder memory and the padded images are not needed from here
        # on: they go before the post-processing, whose full-size masks make the inference peak
        del out
        # NaN / inf outputs would become NaN scores and a meaningless AP: refuse to report them
        check_finite([("class logits", logits), ("mask kernels", kernels),
                      ("mask features", mask_features)], "predictions (inference)")
        # masks only for the top-k (query, class) pairs, not for every query; then the mask
        # features go too
        tops = [select_topk(logits[i], self.test_topk) for i in range(len(batched_inputs))]
        mask_logits = [predict_masks(kernels[i, query_idx][None], mask_features[i:i + 1])[0]
                       for i, (_, query_idx, _) in enumerate(tops)]
        del mask_features
        results = []
        for x, image_size, (cls_scores, _, classes) in zip(batched_inputs, image_sizes, tops):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            # (pop: the post-processing holds the only reference to the logits and frees them)
            inst = instances_from_topk(cls_scores, classes, mask_logits.pop(0), image_size,
                                       (height, width), self.mask_stride, self.mask_threshold,
                                       self.chunk_pixels, score_threshold=self.score_threshold,
                                       max_mask_bytes=self.max_mask_bytes, dedup=self.dedup,
                                       dedup_iou=self.dedup_iou, dedup_sigma=self.dedup_sigma)
            results.append({"instances": inst})
        return results
