#!/usr/bin/env python
"""Run a freshly built ISDA extension (a ``_C*.so`` outside the installed package) against
independent references; exit status 0 when every check passes.

    python tools/setup/check_built_op.py build_compiler_check/g++-11/lib/isda/_C.<abi>.so

The file is loaded as ``isda._C`` before the repository's ``isda`` package is imported, so the
module's own code paths use it too; ``isda/__init__.py`` (datasets, Detectron2) is not run.

* ms_deform_attn forward and backward, float64 (to 1e-12) and float32 (1e-5), decoder-like and
  encoder-like shapes (the backward switches to its head-major layout for the latter), against
  ``ms_deform_attn_reference`` (``F.grid_sample``) and its autograd gradients in float64.
  The operators ``torch.ops.isda.ms_deform_attn`` / ``ms_deform_attn_backward`` that loading
  the file registers are called directly.
"""
import importlib.util
import os
import sys
import types

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


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


def check_msda(reference):
    cases = [  # (levels, N, Lq, M, D, P): decoder-like (Lq*L*P < S) and encoder-like
        ([(6, 5), (3, 4), (1, 2)], 2, 7, 2, 12, 3),
        ([(4, 4), (2, 3)], 1, 40, 3, 16, 4),
        ([(5, 7)], 2, 3, 1, 5, 2),
    ]
    tolerances = {torch.float64: 1e-12, torch.float32: 1e-5}  # relative to max |ref|
    for dtype, tol in tolerances.items():
        for i, (hw, N, Lq, M, D, P) in enumerate(cases):
            value, shapes, starts, loc, attn, grad_out = msda_inputs(hw, N, Lq, M, D, P, dtype, i)
            out = torch.ops.isda.ms_deform_attn(value, shapes, starts, loc, attn)
            grads = torch.ops.isda.ms_deform_attn_backward(value, shapes, starts, loc, attn,
                                                           grad_out)
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


def main():
    import argparse

    ap = argparse.ArgumentParser(description="Check a freshly built ISDA extension against "
                                             "independent references (float64 grid_sample)")
    ap.add_argument("op", help="the built isda._C shared object (_C*.so)")
    args = ap.parse_args()
    if not os.path.isfile(args.op):
        ap.error(f"{args.op}: no such file")
    torch.set_num_threads(2)
    ext = load(os.path.abspath(args.op))
    from isda.layers.ms_deform_attn import ms_deform_attn_reference  # after load(): see there

    import isda
    assert isda._C is ext and sys.modules["isda._C"].__file__ == ext.__file__
    check_msda(ms_deform_attn_reference)
    print(f"OK: {args.op}")


if __name__ == "__main__":
    main()
