"""ISDA's data augmentation: the DETR recipe in Detectron2 ``Augmentation`` terms.

Training: horizontal flip (0.5; ``INPUT.RANDOM_FLIP`` "vertical" / "both" / "none" for other
data), optionally a transpose (``INPUT.ISDA.RANDOM_TRANSPOSE``: with the two flips it gives all
eight 90-degree rotations and mirrors, for orientation-free images such as microscopy); then with
probability 0.5 a multi-scale resize (short side
from ``INPUT.MIN_SIZE_TRAIN``, long side <= ``INPUT.MAX_SIZE_TRAIN``), otherwise
[resize the short side to one of ``INPUT.CROP.PRE_RESIZE_SIZES`` -> random crop of an
absolute size in ``INPUT.CROP.SIZE`` -> the same multi-scale resize].
Test: resize the short side to ``INPUT.MIN_SIZE_TEST`` (long side <= ``INPUT.MAX_SIZE_TEST``).
"""
from typing import List, Sequence

import numpy as np
from detectron2.data import transforms as T


class TransposeTransform(T.Transform):
    """Swap the image axes: (H, W, C) -> (W, H, C); point (x, y) -> (y, x). Its own inverse."""

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.swapaxes(img, 0, 1))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.swapaxes(segmentation, 0, 1))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(coords[:, ::-1])

    def apply_box(self, box: np.ndarray) -> np.ndarray:
        return np.asarray(box)[:, [1, 0, 3, 2]]

    def inverse(self) -> T.Transform:
        return self


class RandomTranspose(T.Augmentation):
    """Transpose the image with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"INPUT.ISDA.RANDOM_TRANSPOSE must be a probability in [0, 1], got {prob}")
        self.prob = prob

    def get_transform(self, image):
        return TransposeTransform() if self._rand_range() < self.prob else T.NoOpTransform()

    def __repr__(self):
        return f"RandomTranspose(prob={self.prob})"


_FLIPS = {"none": (), "horizontal": ("h",), "vertical": ("v",), "both": ("h", "v")}


class RandomChoice(T.Augmentation):
    """Apply one of several augmentations (or lists of them), picked with given probabilities."""

    def __init__(self, choices: Sequence, probs: Sequence[float]):
        super().__init__()
        if len(choices) != len(probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"RandomChoice needs one probability per choice summing to 1, got {probs}")
        self.choices = [T.AugmentationList(list(c)) if isinstance(c, (list, tuple)) else c
                        for c in choices]
        self.probs = np.asarray(probs, dtype=np.float64)

    def __call__(self, aug_input):
        idx = int(np.random.choice(len(self.choices), p=self.probs))
        return self.choices[idx](aug_input)

    def get_transform(self, *args):  # pragma: no cover - __call__ is used instead
        raise NotImplementedError("RandomChoice is applied through __call__")

    def __repr__(self):
        return f"RandomChoice({self.choices}, probs={self.probs.tolist()})"


def build_isda_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    augs: List[T.Augmentation] = []
    flips = _FLIPS.get(cfg.INPUT.RANDOM_FLIP)
    if flips is None:
        raise ValueError(f"INPUT.RANDOM_FLIP must be one of {sorted(_FLIPS)}, "
                         f"got {cfg.INPUT.RANDOM_FLIP!r}")
    for axis in flips:
        augs.append(T.RandomFlip(horizontal=axis == "h", vertical=axis == "v"))
    if cfg.INPUT.ISDA.RANDOM_TRANSPOSE > 0:
        augs.append(RandomTranspose(float(cfg.INPUT.ISDA.RANDOM_TRANSPOSE)))
    multiscale = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                      cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.PROB > 0:
        crop_branch = [
            T.ResizeShortestEdge(cfg.INPUT.CROP.PRE_RESIZE_SIZES, 1333, "choice"),
            T.RandomCrop(cfg.INPUT.CROP.TYPE, tuple(cfg.INPUT.CROP.SIZE)),
            multiscale,
        ]
        p = float(cfg.INPUT.CROP.PROB)
        augs.append(RandomChoice([multiscale, crop_branch], [1.0 - p, p]) if p < 1 else
                    T.AugmentationList(crop_branch))
    else:
        augs.append(multiscale)
    return augs
