#!/usr/bin/env python
"""Run a freshly built ISDA extension (a ``_C*.so`` outside the installed package) against
independent references; exit status 0 when every check passes.

    python tools/setup/check_built_op.py build_compiler_check/g++-11/lib/isda/_C.<abi>.so

The file is loaded as ``isda._C`` before the repository's ``isda`` package is imported, so the
module's own code paths use it too; ``isda/__init__.py`` (datasets, Detectron2) is not run.

* ms_deform_attn forward and backward, float64 (to 1e-12) and float32 (1e-5), decoder-like and
  encoder-like shapes (the backward switches to its head-major layout for the latter), against
  ``ms_deform_attn_reference`` (``F.grid_sample``) and its autograd gradients in float64.
* dropout forward (plain and fused ReLU) and backward against the documented counter-based
  stream (splitmix64, ops/csrc/dropout.h) evaluated here in numpy: masks bit-exact.
"""
import importlib.util
import os
import sys
import types

import numpy as np
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def load_dropout(so_path):
    spec = importlib.util.spec_from_file_location("isda._dropout", so_path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    return ext


def load(so_path):
    spec = importlib.util.spec_from_file_location("isda._C", so_path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    # a bare package object for `isda`: its subpackages import from the repository, and
    # `from isda import _C` inside them finds this extension
    pkg = types.ModuleType("isda")
    pkg.__path__ = [os.path.join(REPO, "isda")]
    pkg._C = ext
    sys.modules["isda"] = pkg
    sys.modules["isda._C"] = ext
    return ext


def msda_inputs(hw, N, Lq, M, D, P, dtype, seed):
    """Random inputs whose locations keep >= 0.1 pixel away from pixel centres' grid lines (the
    bilinear weights are smooth there, so gradients are unambiguous) and span one pixel beyond
    every border (zero padding)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(hw, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    L = len(hw)
    value = torch.randn(N, int(sizes.sum()), M, D, generator=g, dtype=torch.float64)
    loc = torch.empty(N, Lq, M, L, P, 2, dtype=torch.float64)
    for lvl, (H, W) in enumerate(hw):
        for axis, size in ((0, W), (1, H)):
            k = torch.randint(-1, size + 1, (N, Lq, M, P), generator=g).to(torch.float64)
            u = torch.rand(N, Lq, M, P, generator=g, dtype=torch.float64) * 0.8 + 0.1
            loc[:, :, :, lvl, :, axis] = (k + u + 0.5) / size
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    grad_out = torch.randn(N, Lq, M * D, generator=g, dtype=torch.float64)
    cast = [t.to(dtype) for t in (value, loc, attn, grad_out)]
    return cast[0], shapes, starts, cast[1], cast[2], cast[3]


def check_msda(ext, reference):
    cases = [  # (levels, N, Lq, M, D, P): decoder-like (Lq*L*P < S) and encoder-like
        ([(6, 5), (3, 4), (1, 2)], 2, 7, 2, 12, 3),
        ([(4, 4), (2, 3)], 1, 40, 3, 16, 4),
        ([(5, 7)], 2, 3, 1, 5, 2),
    ]
    tolerances = {torch.float64: 1e-12, torch.float32: 1e-5}  # relative to max |ref|
    for dtype, tol in tolerances.items():
        for i, (hw, N, Lq, M, D, P) in enumerate(cases):
            value, shapes, starts, loc, attn, grad_out = msda_inputs(hw, N, Lq, M, D, P, dtype, i)
            out = ext.ms_deform_attn_forward(value, shapes, starts, loc, attn)
            grads = ext.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad_out)
            # reference in float64 whatever dtype the op ran in, with its autograd gradients
            ref_in = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
            ref = reference(ref_in[0], shapes, starts, ref_in[1], ref_in[2])
            ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
            named = [("forward", out, ref)] + [
                (f"grad_{n}", got, want)
                for n, got, want in zip(("value", "sampling_locations", "attention_weights"),
                                        grads, ref_grads)]
            for name, got, want in named:
                assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
                assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {want.shape}"
                err = (got.double() - want).abs().max().item()
                scale = max(1.0, want.abs().max().item())
                assert err <= tol * scale, (f"ms_deform_attn {name} {dtype} case {i}: "
                                            f"max |error| {err:.3g} > {tol * scale:.3g}")
    print(f"ms_deform_attn forward/backward match the float64 grid_sample reference "
          f"({len(cases)} shapes x float64/float32)")


def dropout_words(seed, n):
    """32-bit words of elements 0..n-1 of the stream `seed` (ops/csrc/dropout.h)."""
    gamma = np.uint64(0x9E3779B97F4A7C15)
    pairs = np.arange((n + 1) // 2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2 ** 64) + pairs * gamma
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    words = np.empty(2 * len(pairs), dtype=np.uint64)
    words[0::2] = z & np.uint64(0xFFFFFFFF)
    words[1::2] = z >> np.uint64(32)
    return words[:n]


def check_dropout(ext):
    n = 3 * 16384 + 1029  # several parallel tasks and inner blocks, odd boundaries
    for dtype in (torch.float32, torch.float64):
        for p, seed, relu in ((0.1, 12345, False), (0.5, -987654321, True)):
            x = torch.randn(n, generator=torch.Generator().manual_seed(seed % 1000), dtype=dtype)
            out, mask = ext.dropout_forward(x, p, seed, relu)
            keep = dropout_words(seed, n) >= np.uint64(round(p * 2 ** 32))
            if relu:
                keep &= (x > 0).numpy()
            assert mask.dtype == torch.uint8 and np.array_equal(mask.numpy().astype(bool), keep), (
                f"dropout mask differs from the documented stream ({dtype}, p={p}, relu={relu})")
            scale = 1.0 / (1.0 - p)
            want = torch.where(torch.from_numpy(keep), x * scale, torch.zeros_like(x))
            assert torch.allclose(out, want, rtol=1e-6, atol=0), f"dropout output ({dtype}, p={p})"
            grad = torch.randn(n, dtype=dtype)
            grad_in = ext.dropout_backward(grad, mask, scale)
            assert torch.allclose(grad_in, grad * mask.to(dtype) * scale, rtol=1e-6, atol=0), (
                f"dropout backward ({dtype}, p={p})")
    print("dropout forward/backward match the documented counter-based stream")


def main():
    import argparse

    ap = argparse.ArgumentParser(description="Check a freshly built ISDA extension against "
                                             "independent references (float64 grid_sample, the "
                                             "documented dropout stream)")
    ap.add_argument("op", help="the built isda._C shared object (_C*.so)")
    ap.add_argument("dropout", nargs="?", help="the built isda._dropout shared object, optional")
    args = ap.parse_args()
    for path in filter(None, (args.op, args.dropout)):
        if not os.path.isfile(path):
            ap.error(f"{path}: no such file")
    torch.set_num_threads(2)
    ext = load(os.path.abspath(args.op))
    from isda.layers.ms_deform_attn import ms_deform_attn_reference  # after load(): see there

    import isda
    assert isda._C is ext and sys.modules["isda._C"].__file__ == ext.__file__
    check_msda(ext, ms_deform_attn_reference)
    if args.dropout:
        check_dropout(load_dropout(os.path.abspath(args.dropout)))
    print(f"OK: {' '.join(filter(None, (args.op, args.dropout)))}")


if __name__ == "__main__":
    main()
