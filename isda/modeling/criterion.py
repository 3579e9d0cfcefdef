"""ISDA's losses: sigmoid focal loss on classes, dice loss on matched masks, deep supervision."""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise focal loss (summed by the caller). logits, targets: same shape."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def dice_loss(mask_logits, targets, eps=1e-3):
    """Per-mask dice loss in the V-Net / SOLOv2 form (mmdetection's non-naive ``DiceLoss``):
    ``1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps)``.

    Unlike the "+1"-smoothed form, an empty prediction is never a minimum for a non-empty
    target, so queries matched to hard targets do not collapse to all-background masks.
    mask_logits, targets: [M, P] -> [M]."""
    p = mask_logits.sigmoid()
    num = 2 * (p * targets).sum(-1)
    den = (p * p).sum(-1) + (targets * targets).sum(-1) + 2 * eps
    return 1 - num / den


def _dense_view(t):
    """``t`` itself, or when its memory is dense in another dimension order (channels-last
    mask features, for example) a permuted view that is contiguous: the same elements, so a
    reduction over all of them reads memory in order instead of copying ``t`` first (80 ms for
    ISDA-R50's stride-4 mask features at 800x1216)."""
    if t.is_contiguous() or t.dim() < 2:
        return t
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))
    view = t.permute(order)
    return view if view.is_contiguous() else t


def check_finite(tensors, what, losses=()):
    """Raise ``FloatingPointError`` if a tensor of ``tensors`` ([(name, tensor)], first dimension
    of a 4-d+ tensor = decoder layer) holds NaN or inf; the message names each such tensor with
    its NaN / inf counts (and decoder layers), and ``losses`` (the losses that cannot be
    computed). One host synchronisation when everything is finite; the minimum and maximum of
    each tensor (NaN propagates through them) are much cheaper than ``isfinite(t).all()``."""
    extremes = torch.stack([torch.stack(torch.aminmax(_dense_view(t.detach()))).float()
                            if t.numel() else t.new_zeros(2, dtype=torch.float32)
                            for _, t in tensors])
    flags = torch.isfinite(extremes).all(1).tolist()
    if all(flags):
        return
    parts = []
    for (name, t), ok in zip(tensors, flags):
        if ok:
            continue
        t = t.detach()
        where = ""
        if t.dim() >= 4 and name != "mask features":
            bad_layers = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()
            where = f" (decoder layers {', '.join(map(str, bad_layers))})"
        parts.append(f"{name} {list(t.shape)}{where}: {int(torch.isnan(t).sum())} NaN, "
                     f"{int(torch.isinf(t).sum())} inf of {t.numel()} values")
    msg = f"Non-finite {what}: " + "; ".join(parts)
    if losses:
        msg += f". Losses not computed: {', '.join(losses)}"
    raise FloatingPointError(msg + ". The learning rate may be too high, or the weights or "
                             "the input hold extreme values")


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def num_instances_normaliser(targets, device):
    """Number of GT instances in the batch, averaged over workers, clamped to >= 1."""
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if _world_size() > 1:
        dist.all_reduce(n)
    return (n / _world_size()).clamp(min=1).item()


class SetCriterion(nn.Module):
    """Focal loss over all queries and dice loss over matched queries, normalised by the number of
    GT instances; applied to every decoder layer's predictions when ``deep_supervision``.

    Training-only query groups (``aux_groups`` > 0; the decoder then returns
    ``(1 + aux_groups) x num_queries`` queries, the model's own first): each extra group is matched
    on its own, every GT instance ``aux_repeats`` times (1: Group DETR's one-to-one groups;
    > 1: H-DETR's one-to-many branch), and its losses, normalised by ``aux_repeats`` x the number
    of instances and weighted by ``aux_weight``, are summed into ``loss_focal_aux`` /
    ``loss_dice_aux`` (with the layer suffix)."""

    def __init__(self, num_classes, matcher, focal_weight=2.0, dice_weight=3.0, focal_alpha=0.25,
                 focal_gamma=2.0, deep_supervision=True, num_queries=None, aux_groups=0,
                 aux_repeats=1, aux_weight=1.0):
        super().__init__()
        if aux_groups and not num_queries:
            raise ValueError("query groups need num_queries (the queries per group)")
        if aux_repeats < 1:
            raise ValueError(f"MODEL.ISDA.AUX_GROUP_REPEATS must be >= 1, got {aux_repeats}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.alpha = focal_alpha
        self.gamma = focal_gamma
        self.deep_supervision = deep_supervision
        self.num_queries = num_queries
        self.aux_groups = aux_groups
        self.aux_repeats = aux_repeats
        self.aux_weight = aux_weight

    def layer_losses(self, logits, src_masks, indices, targets, num_inst):
        """logits: [N, Q, K]; src_masks: [M, P] mask logits of the matched queries (image order,
        then match order); indices: the matcher's output -> dict of two scalar losses."""
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        device = logits.device
        batch_idx, query_idx = batch_idx.to(device), query_idx.to(device)

        cls_target = torch.zeros_like(logits)
        labels = torch.cat([t["labels"][g.to(device)] for t, (_, g) in zip(targets, indices)])
        cls_target[batch_idx, query_idx, labels] = 1.0
        loss_focal = sigmoid_focal_loss(logits, cls_target, self.alpha, self.gamma).sum() / num_inst

        tgt_masks = torch.cat([t["masks"][g.to(device)] for t, (_, g) in zip(targets, indices)])
        tgt_masks = tgt_masks.flatten(1).to(src_masks.dtype)
        loss_dice = dice_loss(src_masks, tgt_masks).sum() / num_inst
        return {"loss_focal": self.focal_weight * loss_focal, "loss_dice": self.dice_weight * loss_dice}

    def _match(self, logits, kernels, mask_features, targets, repeats, layer, loss_names,
               ious=None):
        where = f"decoder layer {layer}" if isinstance(layer, int) else f"the {layer}"
        try:
            if ious is None:  # matchers without precomputed IoUs
                return self.matcher(logits.float(), kernels.detach(), mask_features.detach(),
                                    targets, repeats=repeats)
            return self.matcher(logits.float(), kernels.detach(), mask_features.detach(), targets,
                                repeats=repeats, ious=ious)
        except ValueError as e:
            # finite but extreme outputs can still overflow inside the matching cost
            if "invalid numeric entries" not in str(e):
                raise
            raise FloatingPointError(
                f"Non-finite Hungarian matching cost of {where} (finite but "
                f"extreme model outputs overflowed: {e}). Losses not computed: "
                f"{', '.join(loss_names)}") from None

    def forward(self, all_logits, all_kernels, mask_features, targets, encoder_outputs=None):
        """all_logits: [layers, N, Q, K]; all_kernels: [layers, N, Q, D] mask kernels applied to
        ``mask_features`` [N, D, H, W] (the mask logits of every query are only computed without
        gradient for matching, and with gradient only for the matched queries, all layers in one
        product per image); targets: list (per image) of {"labels": [G], "masks": [G, H, W]
        soft targets on the mask grid}; encoder_outputs (two-stage): (logits [N, Q, K],
        kernels [N, Q, D]) of the encoder proposals, matched one-to-one like a decoder layer.
        Returns a dict of losses; layer l < last is suffixed ``_l``, the extra groups' ``_aux``,
        the proposals' ``_enc``."""
        num_inst = num_instances_normaliser(targets, all_logits.device)
        n_layers = all_logits.shape[0]
        layers = list(range(n_layers)) if self.deep_supervision else [n_layers - 1]
        groups = 1 + self.aux_groups if all_logits.shape[2] != self.num_queries else 1
        if self.num_queries and all_logits.shape[2] != self.num_queries * groups:
            raise ValueError(f"{all_logits.shape[2]} queries: expected {self.num_queries} x "
                             f"{groups} groups")
        q = all_logits.shape[2] // groups
        # one job per (group, layer), the model's own group first, then the proposals:
        # (loss-name suffix, logits [N, Q, K], kernels [N, Q, D], repeats, layer)
        jobs = []
        for g in range(groups):
            for l in layers:
                suffix = ("_aux" if g else "") + ("" if l == n_layers - 1 else f"_{l}")
                jobs.append((suffix, all_logits[l, :, g * q:(g + 1) * q],
                             all_kernels[l, :, g * q:(g + 1) * q], self.aux_repeats if g else 1, l))
        outputs = [("class logits", all_logits), ("mask kernels", all_kernels),
                   ("mask features", mask_features)]
        if encoder_outputs is not None:
            jobs.append(("_enc", encoder_outputs[0], encoder_outputs[1], 1, "proposals"))
            outputs += [("proposal class logits", encoder_outputs[0][None]),
                        ("proposal mask kernels", encoder_outputs[1][None])]
        loss_names = list(dict.fromkeys(k + j[0] for j in jobs for k in ("loss_focal",
                                                                          "loss_dice")))
        # NaN / inf outputs (e.g. after a step with an absurd learning rate) stop training here
        # with their names, not inside scipy's assignment solver
        check_finite(outputs, "model outputs before Hungarian matching", loss_names)
        # the soft mask IoUs of all jobs in one product per image, when the matcher offers it
        soft_ious = getattr(self.matcher, "soft_ious", None)
        ious = (soft_ious([j[2].detach() for j in jobs], mask_features.detach(), targets)
                if soft_ious is not None else [None] * len(jobs))
        all_indices = [self._match(logits, kernels, mask_features, targets, repeats, layer,
                                   loss_names, job_ious)
                       for (_, logits, kernels, repeats, layer), job_ious in zip(jobs, ious)]
        if groups == 1 and encoder_outputs is None:
            kernels = all_kernels[layers]
        else:
            kernels = torch.stack([j[2] for j in jobs])
        src = matched_kernel_masks(kernels, mask_features, all_indices)
        losses = {}
        for (suffix, logits, _, repeats, _), indices, src_masks in zip(jobs, all_indices, src):
            weight = self.aux_weight if suffix.startswith("_aux") else 1.0
            out = self.layer_losses(logits.float(), src_masks, indices, targets,
                                    num_inst * repeats)
            for k, v in out.items():
                key = k + suffix
                losses[key] = losses[key] + weight * v if key in losses else weight * v
        return losses


def matched_kernel_masks(kernels, mask_features, all_indices):
    """Mask logits (with gradient) of the matched queries of every layer.

    kernels: [layers, N, Q, D]; mask_features: [N, D, H, W]; all_indices: per layer, the
    matcher's per-image (query indices, target indices) -> per layer [M_l, H * W] float, rows in
    image order then match order. One batched product for all layers and images: each image's
    matched kernels of all layers, zero-padded to the largest count, times its [D, H * W]
    features; the rows are then picked with one index. The backward pass thus writes the
    features' gradient once ([N, D, H * W]), where a product per image (``feats[i]``) made each
    image's select allocate a zero-filled gradient of the whole batch's features.

    An image without matches still goes through the product (zero rows): the losses then stay
    connected to the kernels and the mask features, whose parameters receive zero gradients.
    Under DistributedDataParallel every rank must produce a gradient for every parameter, also a
    rank whose images have no instance."""
    n, d = mask_features.shape[:2]
    feats = mask_features.reshape(n, d, -1)
    device = kernels.device
    rows, sizes = [], []  # per image: [M_i, D] (layers in order), per layer counts
    for i in range(n):
        parts = [kernels[l, i, ind[i][0].to(device)] for l, ind in enumerate(all_indices)]
        sizes.append([p.shape[0] for p in parts])
        rows.append(torch.cat(parts))
    m_max = max(r.shape[0] for r in rows)
    padded = torch.stack([F.pad(r, (0, 0, 0, m_max - r.shape[0])) for r in rows])
    prod = torch.bmm(padded, feats).reshape(n * m_max, feats.shape[-1])
    # row order of the result: layer, then image, then match
    starts = [[i * m_max + sum(sz[:l]) for l in range(len(sz))] for i, sz in enumerate(sizes)]
    pick = [r for l in range(len(all_indices)) for i in range(n)
            for r in range(starts[i][l], starts[i][l] + sizes[i][l])]
    picked = prod[torch.as_tensor(pick, dtype=torch.long, device=prod.device)]
    per_layer = [sum(sz[l] for sz in sizes) for l in range(len(all_indices))]
    return [part.float() for part in picked.split(per_layer)]
