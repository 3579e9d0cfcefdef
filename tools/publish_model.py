#!/usr/bin/env python
"""Publish a trained checkpoint: keep the weights only, name the files by their md5.

    python tools/publish_model.py output/model_final.pth release/ [--name isda_r50_nuclei]

Reads IN safely (``isda.checkpoint``), drops the optimizer, scheduler, iteration and any other
trainer state, and writes into OUT_DIR

- ``<name>-<md5[:8]>.pth``: ``{"model": state_dict, "isda_sha256": content checksum}``, ``md5``
  being this file's own md5;
- ``<name>-<md5[:8]>.safetensors``: the same tensors (contiguous, no shared storage), with the
  same stem so the pair is easy to match; its own md5 is printed, and its metadata records the
  ``.pth`` md5 and the same content checksum (``isda_sha256``), which loading verifies.

Either file is a valid ``MODEL.WEIGHTS`` for ISDA. Non-finite weights are refused (reading and
writing); the files get the permissions of the umask (``0o666 & ~umask``, like any new file), are
written to temporary files and renamed. The last stdout line is a JSON summary.
"""
import argparse
import hashlib
import json
import os
import sys

import torch


def md5sum(path, chunk=1 << 20):
    """Hex md5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def clean_state_dict(state_dict):
    """Tensors only, detached, on the CPU, contiguous and with private storage (safetensors
    refuses tensors sharing memory); a DDP ``module.`` prefix is stripped."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    out, dropped = {}, []
    for k, v in state_dict.items():
        if not torch.is_tensor(v):
            dropped.append(k)
            continue
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out, dropped


def publish(src, out_dir, name=None):
    """Write the .pth/.safetensors pair; returns a summary dict."""
    from safetensors.torch import save_file

    from isda.checkpoint import (CHECKSUM_KEY, _temp_file, atomic_torch_save, content_checksum,
                                 load_checkpoint_file)

    ckpt = load_checkpoint_file(src)  # refuses pickled code, a bad checksum, NaN / inf weights
    stripped = sorted(k for k in ckpt if k not in ("model", "matching_heuristics"))
    state, dropped = clean_state_dict(ckpt["model"])
    if name is None:
        name = os.path.splitext(os.path.basename(src))[0]
    os.makedirs(out_dir, exist_ok=True)
    checksum = content_checksum({"model": state})

    # the .pth is named by its own md5: written under a temporary name first (atomically,
    # umask's mode), then renamed
    fd, provisional = _temp_file(os.path.join(out_dir, name + ".pth"))
    os.close(fd)
    try:
        atomic_torch_save({"model": state}, provisional)
        digest = md5sum(provisional)
        stem = f"{name}-{digest[:8]}"
        pth = os.path.join(out_dir, stem + ".pth")
        os.replace(provisional, pth)
    finally:
        if os.path.exists(provisional):
            os.unlink(provisional)

    sft = os.path.join(out_dir, stem + ".safetensors")
    atomic_file(sft, lambda tmp: save_file(state, tmp, metadata={
        "format": "pt", "pth_md5": digest, CHECKSUM_KEY: checksum}))
    return {
        "pth": pth, "pth_md5": digest, "pth_bytes": os.path.getsize(pth),
        "safetensors": sft, "safetensors_md5": md5sum(sft),
        "safetensors_bytes": os.path.getsize(sft),
        "tensors": len(state), "stripped": stripped, "dropped_non_tensors": dropped,
        "content_sha256": checksum,
    }


def atomic_file(path, write):
    """``write(tmp_path)`` into a temporary file beside ``path`` (``.<name>.XXXXXXXX.tmp``, so an
    interrupted run's leftover is cleaned by the next save in that folder), then chmod to the
    umask's mode and rename; the temporary file is removed on failure."""
    from isda.checkpoint import _temp_file, umask_file_mode

    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint written by training (.pth) or any loadable file")
    parser.add_argument("out_dir", help="folder for the published files")
    parser.add_argument("--name", help="file name stem (default: the input's)")
    args = parser.parse_args(argv)
    info = publish(args.input, args.out_dir, args.name)
    if info["stripped"]:
        print(f"stripped trainer state: {', '.join(info['stripped'])}")
    if info["dropped_non_tensors"]:
        print(f"dropped non-tensor entries of the state dict: {info['dropped_non_tensors']}")
    print(f"{info['pth']}  md5 {info['pth_md5']}  {info['pth_bytes'] / 2**20:.1f} MiB")
    print(f"{info['safetensors']}  md5 {info['safetensors_md5']}  "
          f"{info['safetensors_bytes'] / 2**20:.1f} MiB")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
