#!/usr/bin/env python
"""Multi-scale deformable attention on the CPU: the compiled op against the grid_sample reference.

    python benchmarks/ms_deform_attn.py            # encoder and decoder shapes, batch 1 and 2
    python benchmarks/ms_deform_attn.py --quick    # encoder batch 1, 3 repeats (about a minute)

Deformable DETR at 800x1216: levels 100x152 .. 13x19 (S = 20197), 8 heads of 32 channels, 4
levels, 4 points; encoder: S queries sampling around their own pixels, decoder: 300 queries.
Times: medians after a warm-up; memory: peak RSS of one pass in a fresh process. Prints a table;
the last stdout line is one JSON object (encoder shape, batch 1).
"""
import argparse
import json
import os
import sys

import torch

from isda_vs_maskrcnn import fresh_process, medians_ms, peak_mb

LEVELS = [(100, 152), (50, 76), (25, 38), (13, 19)]
M, D, P = 8, 32, 4
IMPLS = ("reference", "compiled")


def make_inputs(shape: str, batch: int, requires_grad: bool, seed: int = 0):
    """(value [N,S,M,D], spatial_shapes, level_start_index, locations [N,Lq,M,L,P,2],
    attention_weights [N,Lq,M,L,P]) in float32."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), len(LEVELS)
    if shape == "encoder":  # reference point: the query's own pixel centre
        grids = [torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W,
                                indexing="ij") for H, W in LEVELS]
        ref = torch.cat([torch.stack([x, y], -1).reshape(-1, 2) for y, x in grids])
        ref = ref.expand(batch, S, 2)
    else:
        ref = torch.rand(batch, 300, 2, generator=g)
    Lq = ref.shape[1]
    pixel = torch.tensor([[1.0 / W, 1.0 / H] for H, W in LEVELS]).view(1, 1, 1, L, 1, 2)
    loc = ref[:, :, None, None, None, :] + torch.randn(batch, Lq, M, L, P, 2, generator=g) * 2 * pixel
    value = torch.randn(batch, S, M, D, generator=g)
    attn = torch.rand(batch, Lq, M, L * P, generator=g).softmax(-1).view(batch, Lq, M, L, P)
    grad_out = torch.randn(batch, Lq, M * D, generator=g)
    tensors = [t.contiguous().requires_grad_(requires_grad) for t in (value, loc, attn)]
    return tensors[0], shapes, starts, tensors[1], tensors[2], grad_out


def run_once(impl: str, args, backward: bool):
    from isda.layers.ms_deform_attn import ms_deform_attn, set_backend

    value, shapes, starts, loc, attn, grad_out = args
    with set_backend(impl):
        if not backward:
            with torch.no_grad():
                return ms_deform_attn(value, shapes, starts, loc, attn)
        for t in (value, loc, attn):
            t.grad = None
        out = ms_deform_attn(value, shapes, starts, loc, attn)
        out.backward(grad_out)
        return out


def memory_worker(shape: str, batch: int, impl: str, backward: bool) -> None:
    """Subprocess body: print the peak RSS increase (MB) of one pass."""
    import isda.layers.ms_deform_attn  # noqa: F401  (import cost outside the measurement)

    args = make_inputs(shape, batch, requires_grad=backward)
    print(json.dumps({"peak_mb": max(0.0, peak_mb(lambda: run_once(impl, args, backward)))}))


def measure_memory(*key) -> float:
    """(shape, batch, impl, backward) in a fresh process -> peak MB."""
    return fresh_process([__file__, "--memory-worker", json.dumps(key)])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="encoder batch 1 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.memory_worker:
        return memory_worker(*json.loads(opts.memory_worker))

    from isda.layers.ms_deform_attn import compiled_available

    if not compiled_available("cpu"):
        sys.exit("isda._C is not built: run `pip install --no-build-isolation -e .` first")
    repeats = opts.repeats or (3 if opts.quick else 7)
    configs = [("encoder", 1)] if opts.quick else [("encoder", 1), ("encoder", 2),
                                                   ("decoder", 1), ("decoder", 2)]
    rows = []
    for shape, batch in configs:
        res = {}
        for impl in IMPLS:
            fwd_args = make_inputs(shape, batch, requires_grad=False)
            bwd_args = make_inputs(shape, batch, requires_grad=True)
            # decoder passes are short: more repeats cost little and steady the median
            reps = repeats if shape == "encoder" else 5 * repeats
            ms = medians_ms({"fwd_ms": lambda: run_once(impl, fwd_args, False),
                             "fwdbwd_ms": lambda: run_once(impl, bwd_args, True)}, reps)
            res[impl] = {**ms,
                "fwd_peak_mb": (float("nan") if opts.quick
                                else measure_memory(shape, batch, impl, False)),
                "fwdbwd_peak_mb": measure_memory(shape, batch, impl, True),
            }
            del fwd_args, bwd_args
        rows.append((shape, batch, res))

    Lq = {"encoder": sum(h * w for h, w in LEVELS), "decoder": 300}
    print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}, float32, "
          f"M={M} D={D} L={len(LEVELS)} P={P}, levels {LEVELS}, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| shape | N | Lq | impl | fwd ms | fwd+bwd ms | fwd peak MB | fwd+bwd peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, batch, res in rows:
        for impl in IMPLS:
            r = res[impl]
            print(f"| {shape} | {batch} | {Lq[shape]} | {impl} | {r['fwd_ms']:.1f} | "
                  f"{r['fwdbwd_ms']:.1f} | {r['fwd_peak_mb']:.1f} | {r['fwdbwd_peak_mb']:.1f} |")
        c, r = res["compiled"], res["reference"]
        print(f"| {shape} | {batch} | {Lq[shape]} | **speedup / mem ratio** | "
              f"**{r['fwd_ms'] / c['fwd_ms']:.1f}x** | **{r['fwdbwd_ms'] / c['fwdbwd_ms']:.1f}x** | "
              f"{c['fwd_peak_mb'] / max(r['fwd_peak_mb'], 1e-3):.3f} | "
              f"{c['fwdbwd_peak_mb'] / max(r['fwdbwd_peak_mb'], 1e-3):.3f} |")
    c, r = rows[0][2]["compiled"], rows[0][2]["reference"]
    def num(x, digits):  # rounded, or None (JSON null) when not measured (NaN)
        return None if x != x else round(x, digits)

    summary = {"shape": "encoder", "batch": 1, "threads": torch.get_num_threads(),
               "repeats": repeats, "fwd_speedup": round(r["fwd_ms"] / c["fwd_ms"], 2),
               "bwd_speedup": round(r["fwdbwd_ms"] / c["fwdbwd_ms"], 2),
               "peak_mem_ratio": num(c["fwdbwd_peak_mb"] / max(r["fwdbwd_peak_mb"], 1e-3), 4),
               "fwd_peak_mem_ratio": num(c["fwd_peak_mb"] / max(r["fwd_peak_mb"], 1e-3), 4)}
    for impl, v in (("compiled", c), ("reference", r)):
        summary.update({f"{impl}_{k}": num(v[k], 2 if k.endswith("ms") else 1) for k in v})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
