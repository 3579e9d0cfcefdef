"""A synthetic training record with hundreds of instances (for the mapper's tests and
``benchmarks/data_pipeline.py``): random convex blobs on a smooth random image, every
``polygon_every``-th one a polygon annotation, the others COCO RLE (compressed, string counts as in a COCO JSON)."""
from pathlib import Path

import numpy as np
from detectron2.structures import BoxMode, polygons_to_bitmask
from PIL import Image
from pycocotools import mask as mask_util


def many_instance_record(folder: Path, n: int = 300, hw=(600, 800), polygon_every: int = 3,
                         seed: int = 0) -> dict:
    """Write ``folder/many_<n>.jpg`` (H, W, 3) and return its Detectron2 dataset dict."""
    h, w = hw
    rng = np.random.default_rng(seed)
    path = Path(folder) / f"many_{n}.jpg"
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)  # smooth, like a photo
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=90)
    annotations = []
    for k in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        radius = rng.uniform(4, 30)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 12))))
        r = radius * rng.uniform(0.6, 1.0, len(angles))
        xs = np.clip(cx + r * np.cos(angles), 0, w)
        ys = np.clip(cy + r * np.sin(angles), 0, h)
        poly = np.stack([xs, ys], axis=1).reshape(-1).tolist()
        if k % polygon_every == 0:
            seg = [poly]
        else:
            mask = polygons_to_bitmask([poly], h, w)
            seg = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            seg["counts"] = seg["counts"].decode("ascii")
        annotations.append({"id": 1000 + k, "category_id": int(k % 5), "iscrowd": 0,
                            "bbox": [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()],
                            "bbox_mode": BoxMode.XYWH_ABS, "segmentation": seg})
    return {"file_name": str(path), "height": h, "width": w, "image_id": 1,
            "annotations": annotations}
