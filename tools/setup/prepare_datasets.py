"""Fetch, convert and cache the embedded datasets: ``python tools/setup/prepare_datasets.py``
(run by ``make setup``).

Sources are registry packages, fetched with pip:

* ``nuclei``: the ``stardist`` wheel's ``stardist/data/images/img2d.tif`` (512x512 uint16
  fluorescence image) and ``mask2d.tif`` (uint16 label image, 125 nuclei). Converted to COCO
  JSON with RLE masks: ``nuclei_train`` = 8 tiles (128 rows x 176 columns) from columns 0-351,
  instances clipped to their tile; ``nuclei_train_region`` = the same columns as one 512x352 image
  (for training on random crops); ``nuclei_val`` = columns 384-511 as 4 tiles of 128x128,
  instances whose mask lies mostly (> 50 %) inside the region kept and clipped to their tile, the
  remaining fragments marked ``iscrowd`` (ignored by COCO evaluation). Columns 352-383 are a guard band.
* ``nuclei3d``: the same wheel's ``img3d.tif`` / ``mask3d.tif`` (a 31 x 61 x 57 fluorescence
  stack of nuclei and its 3-D label image), as 2-D z-slices: ``nuclei3d_train`` = slices 0-19,
  ``nuclei3d_val`` = slices 24-30 (20-23 a guard band); in the held-out slices, the cross-sections
  of nuclei that also appear in a training slice are marked ``iscrowd`` (ignored by COCO
  evaluation), so evaluation counts only nuclei never seen in training. A second, different real
  dataset (another microscope, small images, anisotropic nuclei) for the learning race.
* ``voc_sample``: the ``labelme`` sdist's ``examples/instance_segmentation/data_dataset_coco``
  (3 VOC photos, 12 polygon instances), with the ``_background_`` category dropped.

Everything lands in ``$ISDA_DATASETS`` (default ``datasets/`` in the repository) with a
``MANIFEST.json`` of sha256 checksums; a missing or corrupt file triggers a rebuild of that
dataset. Writes go to a temporary folder that is renamed into place, so an interrupted run
never leaves a half-written dataset behind.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from isda.data.paths import datasets_root

STARDIST_VERSION = "0.9.2"
LABELME_VERSION = "6.3.1"
# Bump when a conversion changes: cached datasets built by an older recipe are rebuilt.
RECIPE = {"nuclei": "3", "nuclei3d": "1", "voc_sample": "2"}

NUCLEI_TRAIN_COLS = (0, 352)   # [start, stop)
NUCLEI_VAL_COLS = (384, 512)
NUCLEI_TILE = (128, 176)       # rows, cols of a training tile
NUCLEI_VAL_TILE_ROWS = 128     # validation tiles: 128 rows x the region's 128 columns
NUCLEI3D_TRAIN_SLICES = (0, 20)   # [start, stop) z-slices
NUCLEI3D_VAL_SLICES = (24, 31)
NUCLEI_CATEGORY = {"id": 1, "name": "nucleus", "supercategory": "cell"}


def cache_root() -> Path:
    return datasets_root() / ".downloads"


def log(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# fetching
# ---------------------------------------------------------------------------------------------
def pip_download(spec: str, pattern: str, sdist: bool) -> Path:
    """Download one distribution file with pip into the cache and return its path."""
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    hits = sorted(cache.glob(pattern))
    if hits:
        return hits[0]
    log(f"downloading {spec} from the package registry")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec]
        if sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
        else:
            cmd[5:5] = ["--only-binary", ":all:"]
        subprocess.run(cmd, check=True)
        got = sorted(Path(tmp).glob(pattern))
        if not got:
            raise RuntimeError(f"pip download {spec} produced no file matching {pattern}")
        dst = cache / got[0].name
        shutil.move(str(got[0]), dst)
    return dst


# ---------------------------------------------------------------------------------------------
# COCO helpers
# ---------------------------------------------------------------------------------------------
def encode_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_annotation(mask: np.ndarray, ann_id: int, image_id: int, iscrowd: int = 0) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {
        "id": ann_id, "image_id": image_id, "category_id": NUCLEI_CATEGORY["id"],
        "segmentation": encode_rle(mask), "area": int(mask.sum()),
        "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(iscrowd),
    }


def to_uint8_rgb(img: np.ndarray) -> np.ndarray:
    """Percentile-normalise a single-channel microscopy image to 8-bit RGB."""
    lo, hi = np.percentile(img, (1.0, 99.8))
    x = np.clip((img.astype(np.float64) - lo) / max(hi - lo, 1e-6), 0, 1)
    g = np.round(x * 255).astype(np.uint8)
    return np.stack([g, g, g], axis=-1)


def write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path, format="PNG")


# ---------------------------------------------------------------------------------------------
# nuclei (stardist)
# ---------------------------------------------------------------------------------------------
def load_stardist_arrays(kind="2d", shape=(512, 512)):
    """The stardist wheel's ``img{kind}.tif`` and ``mask{kind}.tif`` -> (image, int64 labels,
    wheel file name)."""
    import tifffile

    wheel = pip_download(f"stardist=={STARDIST_VERSION}", "stardist-*.whl", sdist=False)
    with zipfile.ZipFile(wheel) as zf:
        img = tifffile.imread(zf.open(f"stardist/data/images/img{kind}.tif"))
        lab = tifffile.imread(zf.open(f"stardist/data/images/mask{kind}.tif"))
    if img.shape != shape or lab.shape != shape:
        raise RuntimeError(f"{wheel.name}: unexpected image shapes {img.shape}, {lab.shape}")
    return img, lab.astype(np.int64), wheel.name


def nuclei_tiles():
    """Training tiles as (row0, row1, col0, col1), row-major."""
    th, tw = NUCLEI_TILE
    c0, c1 = NUCLEI_TRAIN_COLS
    return [(r, r + th, c, c + tw) for r in range(0, 512, th) for c in range(c0, c1, tw)]


def write_tiles(out: Path, rgb: np.ndarray, lab: np.ndarray, tiles, prefix: str,
                crowd_labels=frozenset()):
    """Write each (row0, row1, col0, col1) tile as a PNG; one RLE annotation per label fragment
    inside it (``iscrowd`` for labels in ``crowd_labels``). Returns COCO (images, annotations)."""
    images, anns = [], []
    for image_id, (r0, r1, c0, c1) in enumerate(tiles, start=1):
        name = f"{prefix}_r{r0:03d}_c{c0:03d}.png"
        write_png(out / "images" / name, rgb[r0:r1, c0:c1])
        images.append({"id": image_id, "file_name": name, "height": r1 - r0, "width": c1 - c0,
                       "region": [r0, r1, c0, c1]})
        tile = lab[r0:r1, c0:c1]
        for inst in np.unique(tile[tile > 0]):
            anns.append(mask_annotation(tile == inst, len(anns) + 1, image_id,
                                        iscrowd=int(int(inst) in crowd_labels)))
            anns[-1]["instance_label"] = int(inst)
    return images, anns


def build_nuclei(out: Path) -> None:
    img, lab, src = load_stardist_arrays()
    rgb = to_uint8_rgb(img)
    (out / "images").mkdir(parents=True)
    cats = [NUCLEI_CATEGORY]

    # train: tiles, every instance fragment clipped to its tile
    images, anns = write_tiles(out, rgb, lab, nuclei_tiles(), "train")
    dump_json(out / "nuclei_train.json", images, anns, cats, src)
    # the same region as one image, for random-crop training
    c0, c1 = NUCLEI_TRAIN_COLS
    images, anns = write_tiles(out, rgb, lab, [(0, 512, c0, c1)], "train_region")
    dump_json(out / "nuclei_train_region.json", images, anns, cats, src)

    # val: the region cut into 4 tiles of 128x128 (the scale and shape the model trains on);
    # nuclei mostly (> 50 %) inside the region are targets, clipped to their tile; the others'
    # fragments are marked crowd (ignored by COCO evaluation).
    c0, c1 = NUCLEI_VAL_COLS
    region = lab[:, c0:c1]
    outside = {int(i) for i in np.unique(region[region > 0])
               if int((region == i).sum()) * 2 <= int((lab == i).sum())}
    val_tiles = [(r0, r0 + NUCLEI_VAL_TILE_ROWS, c0, c1)
                 for r0 in range(0, 512, NUCLEI_VAL_TILE_ROWS)]
    images, anns = write_tiles(out, rgb, lab, val_tiles, "val", crowd_labels=outside)
    dump_json(out / "nuclei_val.json", images, anns, cats, src)


def build_nuclei3d(out: Path) -> None:
    img, lab, src = load_stardist_arrays("3d", (31, 61, 57))
    rgb = to_uint8_rgb(img)  # one normalisation for the whole stack
    (out / "images").mkdir(parents=True)
    t0, t1 = NUCLEI3D_TRAIN_SLICES
    seen = {int(i) for i in np.unique(lab[t0:t1]) if i > 0}
    for split, (z0, z1), crowd in (("train", NUCLEI3D_TRAIN_SLICES, frozenset()),
                                   ("val", NUCLEI3D_VAL_SLICES, frozenset(seen))):
        images, anns = [], []
        for z in range(z0, z1):
            # one slice per image: write_tiles on the whole slice, then renumber
            imgs, sl_anns = write_tiles(out, rgb[z], lab[z], [(0, 61, 0, 57)], f"{split}_z{z:02d}",
                                        crowd_labels=crowd)
            image_id = len(images) + 1
            imgs[0]["id"], imgs[0]["z"] = image_id, z
            images.append(imgs[0])
            for a in sl_anns:
                a["id"], a["image_id"] = len(anns) + 1, image_id
                anns.append(a)
        dump_json(out / f"nuclei3d_{split}.json", images, anns, [NUCLEI_CATEGORY], src)


def dump_json(path: Path, images, anns, cats, source: str) -> None:
    data = {"info": {"description": f"ISDA embedded dataset from {source}"},
            "images": images, "annotations": anns, "categories": cats}
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# voc_sample (labelme)
# ---------------------------------------------------------------------------------------------
def build_voc_sample(out: Path) -> None:
    sdist = pip_download(f"labelme=={LABELME_VERSION}", "labelme-*.tar.gz", sdist=True)
    prefix = f"labelme-{LABELME_VERSION}/examples/instance_segmentation/data_dataset_coco/"
    (out / "images").mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        data = json.load(tf.extractfile(prefix + "annotations.json"))
        for img in data["images"]:
            member = tf.extractfile(prefix + img["file_name"])
            name = Path(img["file_name"]).name
            (out / "images" / name).write_bytes(member.read())
            img["file_name"] = name
    bg = {c["id"] for c in data["categories"] if c["name"] == "_background_"}
    data["categories"] = [c for c in data["categories"] if c["id"] not in bg]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] not in bg]
    # labelme numbers annotations from 0, but pycocotools' matcher treats id 0 as "unmatched"
    # (it stores matched ids in a zero-initialised array): renumber from 1.
    for new_id, ann in enumerate(data["annotations"], start=1):
        ann["id"] = new_id
    data.setdefault("info", {})["description"] = f"ISDA embedded dataset from {sdist.name}"
    (out / "voc_sample.json").write_text(json.dumps(data))


BUILDERS = {"nuclei": build_nuclei, "nuclei3d": build_nuclei3d, "voc_sample": build_voc_sample}


# ---------------------------------------------------------------------------------------------
# cache with checksums
# ---------------------------------------------------------------------------------------------
def manifest_ok(folder: Path, name: str) -> bool:
    man = folder / "MANIFEST.json"
    try:
        m = json.loads(man.read_text())
    except (OSError, ValueError):
        return False
    if m.get("recipe") != RECIPE[name]:
        return False
    for rel, digest in m.get("files", {}).items():
        p = folder / rel
        if not p.is_file() or sha256(p) != digest:
            log(f"{name}: {rel} is missing or corrupt; rebuilding")
            return False
    return bool(m.get("files"))


def prepare(name: str, force: bool = False) -> Path:
    root = datasets_root()
    folder = root / name
    if not force and manifest_ok(folder, name):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        BUILDERS[name](tmp)
        files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "MANIFEST.json").write_text(
            json.dumps({"recipe": RECIPE[name], "files": files}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"{name}: built in {folder}")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fetch and convert ISDA's embedded datasets.")
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"datasets to prepare (default: all of {', '.join(BUILDERS)})")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown dataset(s) {unknown}; known: {list(BUILDERS)}")
    for name in args.names or list(BUILDERS):
        folder = prepare(name, force=args.force)
        log(f"{name}: ok ({folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
