"""Where one training step's GPU time goes, against the counted-FLOP model of
bench/train_throughput.py: the kernels of one profiled step grouped into matmuls, attention,
elementwise work and the rest, with the matmuls' and the attention's achieved TFLOP/s against the
FLOPs counted for them, and what the step would have to take for a given fraction of bf16 peak.

    python bench/train_throughput.py --shapes ref --paths fast@128 --steps 5 --no-parity \
        --profile results/runs/prof.txt                   # GPU: writes prof.txt.fast_128.kernels.csv
    python bench/step_breakdown.py results/runs/train_throughput_prof_onegraph_42.kernels.csv \
        --batch 128 --out results/runs/step_breakdown_onegraph_42.json

The kernels CSV has one row per kernel name (`kernel,calls,self_us`, one step). The shape flags
default to the reference shape (T 512, 16 points, 16 latents, 16 ahead), the decoder to
SmolLM2-135M (`--decoder-config` as given to train_throughput.py otherwise). Kernels are grouped by
name (`CATEGORIES`, first match wins): a step spends its time in

  matmul       cuBLAS (nvjet, cutlass, split-K reductions) and quack's CuTe GEMMs (the fused MLPs)
  attention    FlexAttention's kernels (forward, backward and its backward's preprocessing) and
               the prefill's SDPA (cuDNN / flash)
  elementwise  everything inductor fuses around them (norms, rotary, residuals, SiLU, casts, the
               cross-entropy's softmax) and ATen's elementwise and reduction kernels
  optimizer    AdamW's multi-tensor kernels
  memory       memsets and copies
  other        the rest

`--peak` is the GPU's dense bf16 peak (default: an H100's 989 TFLOP/s); `--target` the fraction of
it asked for (default 0.4). Rows that are profiler annotations ("Optimizer.step#AdamW.step")
overlap the kernels they annotate and are skipped (C++ kernels' names hold "#" too, inside their
lambdas' names: only a leading name with "#" marks an annotation).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import PEAK_BF16, counted_flops, decoder_config  # noqa: E402

CATEGORIES = (
    ("annotation", r"^[\w.]+#|^ProfilerStep"),   # record_function ranges, e.g. "Optimizer.step#AdamW.step"
    ("attention", r"flex_attention|cudnn_generated.*sdpa|fmha|flash_fprop|flash_bprop|flash_fwd|flash_bwd"),
    ("matmul", r"nvjet|gemm|Gemm|cutlass|cublas|splitKreduce|xmma"),
    ("optimizer", r"multi_tensor_apply|FusedOpti|adam"),
    ("memory", r"^Memset|^Memcpy|direct_copy"),
    ("elementwise", r"^triton_(poi|per|red)_|elementwise_kernel|reduce_kernel|CatArray|gather|Fill|index"),
)
H100_BF16 = PEAK_BF16["H100"]


def category(kernel: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, kernel):
            return name
    return "other"


def read_kernels(path: str | Path) -> list[dict]:
    """The rows of a kernels CSV: [{"kernel", "calls", "us"}]."""
    with open(path, newline="") as f:
        return [{"kernel": r["kernel"], "calls": int(r["calls"]), "us": float(r["self_us"])}
                for r in csv.DictReader(f)]


def breakdown(rows: list[dict], batch: int, T: int = 512, points: int = 16, num_latents: int = 16,
              n_ahead: int = 16, peak: float = H100_BF16, target: float = 0.4, cfg=None) -> dict:
    """Per category: GPU ms of the step, its share, kernel launches, and for matmul and attention
    the counted FLOPs and the TFLOP/s and fraction of peak they ran at. Plus the whole step's
    counted-FLOP fraction of peak (over the kernels' summed time: no gaps between them) and the
    step time `target` asks for. cfg: the decoder's config (default SmolLM2-135M's)."""
    fl = counted_flops(cfg or decoder_config(), batch, T, points, num_latents, n_ahead)
    linear = batch * sum(fl["linear_per_seq"].values())
    counted = {"matmul": linear, "attention": fl["per_step"] - linear}
    cats: dict[str, dict] = {}
    for r in rows:
        c = category(r["kernel"])
        if c == "annotation":
            continue
        e = cats.setdefault(c, {"ms": 0.0, "calls": 0, "kernels": 0})
        e["ms"] += r["us"] / 1e3
        e["calls"] += r["calls"]
        e["kernels"] += 1
    total = sum(e["ms"] for e in cats.values())
    if total <= 0:
        raise ValueError("no GPU kernels in the profile")
    for c, e in cats.items():
        e["share"] = e["ms"] / total
        if c in counted:
            e["counted_flops"] = counted[c]
            e["tflops_per_s"] = counted[c] / (e["ms"] / 1e3) / 1e12
            e["frac_peak"] = counted[c] / (e["ms"] / 1e3) / peak
    order = ("matmul", "attention", "elementwise", "optimizer", "memory", "other")
    cats = {c: cats[c] for c in order if c in cats}
    return {"batch": batch, "shape": {"T": T, "points": points, "num_latents": num_latents, "n_ahead": n_ahead},
            "peak_flops": peak, "counted_flops_per_step": fl["per_step"], "kernel_ms": total,
            "frac_peak_over_kernel_time": fl["per_step"] / (total / 1e3) / peak,
            "target": target, "target_step_ms": fl["per_step"] / (target * peak) * 1e3,
            "categories": cats}


def table(doc: dict) -> str:
    """The breakdown as a markdown table, then the target line."""
    lines = ["| kernels | GPU ms / step | share | launches | counted TFLOP | TFLOP/s | of peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c, e in doc["categories"].items():
        fl = f"{e['counted_flops'] / 1e12:.1f} | {e['tflops_per_s']:.0f} | {e['frac_peak']:.1%}" \
            if "counted_flops" in e else "| |"
        lines.append(f"| {c} | {e['ms']:.1f} | {e['share']:.1%} | {e['calls']} | {fl} |")
    lines.append(f"| **all** | **{doc['kernel_ms']:.1f}** | | | {doc['counted_flops_per_step'] / 1e12:.1f} | "
                 f"{doc['counted_flops_per_step'] / doc['kernel_ms'] / 1e9:.0f} | "
                 f"{doc['frac_peak_over_kernel_time']:.1%} |")
    lines.append(f"\n{doc['target']:.0%} of peak at batch {doc['batch']}: a step of "
                 f"{doc['target_step_ms']:.1f} ms ({doc['kernel_ms'] - doc['target_step_ms']:.1f} ms "
                 f"less than the kernels above take, with no gaps between them).")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernels", help="a kernels CSV written by bench/train_throughput.py --profile (one step)")
    ap.add_argument("--batch", type=int, required=True, help="the profiled step's batch size")
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--ahead", type=int, default=16)
    ap.add_argument("--peak", type=float, default=H100_BF16, help="dense bf16 peak FLOP/s of the profiled GPU")
    ap.add_argument("--target", type=float, default=0.4, help="fraction of peak to size the step for")
    ap.add_argument("--decoder-config", default="",
                    help="the profiled decoder's folder or config.json, as given to train_throughput.py")
    ap.add_argument("--out", default="", help="also write the breakdown as JSON here")
    args = ap.parse_args(argv)
    if not Path(args.kernels).is_file():
        ap.error(f"no such kernels CSV: {args.kernels}")
    try:
        cfg = decoder_config(args.decoder_config)
    except ValueError as e:
        ap.error(str(e))
    doc = breakdown(read_kernels(args.kernels), args.batch, args.T, args.points, args.latents, args.ahead,
                    args.peak, args.target, cfg)
    doc["source"] = args.kernels
    print(table(doc))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
