"""Training throughput on 1, 2 and 4 GPUs: the real `cacheaug train` under `accelerate launch`.

    python bench/multigpu_throughput.py --out results/multigpu.json                   # DDP, 1/2/4 GPUs
    python bench/multigpu_throughput.py --engines ddp,fsdp --out results/multigpu.json
    python bench/multigpu_throughput.py --tiny --out /tmp/multigpu.json                # CPU smoke test (gloo)

Every measurement is the training command users run, on a SmolLM2-135M-shaped decoder with random
weights (throughput depends on shapes, not weights) and a pack of random tokens, both made once in
a scratch folder. The shape and settings are the shipped recipe's (configs/smollm2_default.yaml:
T=512, 16 points, 16 latents, 16 ahead, 64 sequences per GPU, bf16, compiled blocks, a compact
8-layer copy). The batch per GPU is fixed, so the global batch grows with the GPU count.

  1 GPU      python -m cacheaug_core.cli train ...   (one process: the baseline)
  n GPUs     accelerate launch --config_file configs/accelerate/{ddp,fsdp}.yaml --num_processes n
             -m cacheaug_core.cli train ...

Throughput is original (text) tokens per second, read from the run's metrics.jsonl between the
end of step --warmup-steps and the last step: `tokens_seen` counts every process's tokens and
`elapsed_s` is the main process's clock. Every step ends with `loss.item()`, so both log lines
trail the GPU by the same amount and their difference is the time of the steps between them.

  efficiency(n)          = tokens/s(n) / (n * tokens/s(1 GPU))
  marginal_efficiency(n) = (tokens/s(n) - tokens/s(previous n)) / ((n - previous n) * tokens/s(1 GPU))

The target is at least 0.9 for both at every GPU count. NCCL's NVLink multicast stays off in every
launched process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CONFIGS = {"ddp": ROOT / "configs/accelerate/ddp.yaml", "fsdp": ROOT / "configs/accelerate/fsdp.yaml",
           "cpu": ROOT / "configs/accelerate/cpu2_gloo.yaml"}
RECIPE = ROOT / "configs/smollm2_default.yaml"
TARGET = 0.9
# The tiny CPU smoke test: the same command with small shapes.
TINY_FLAGS = ["--seq-len", "64", "--points", "4", "--n-ahead", "4", "--num-latents", "4", "--num-layers", "1",
              "--batch-size", "2", "--precision", "no", "--no-compile", "--device", "cpu"]


def make_decoder(path: Path, tiny: bool) -> int:
    """A SmolLM2-135M-shaped (or tiny) Llama with random weights, saved as a transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM
    from train_throughput import smollm2_config

    from cacheaug_core.decoder import byte_level_tokenizer

    cfg = smollm2_config(tiny)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if tiny else torch.bfloat16)
    model.save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return cfg.vocab_size


def make_pack(path: Path, vocab: int, tokens: int) -> None:
    """A training pack (train.PackData) of uniformly random tokens."""
    import numpy as np

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, size=tokens, dtype=np.uint16).tofile(path / "train_000.bin")
    rng.integers(0, vocab, size=65_536, dtype=np.uint16).tofile(path / "heldout.bin")
    (path / "pack.json").write_text(json.dumps({"note": "random tokens for throughput measurement", "tokens": tokens}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(n: int, engine: str, train_flags: list[str], tiny: bool) -> list[str]:
    """The command that trains on n GPUs (or n CPU processes with --tiny) with the given engine."""
    train = ["-m", "cacheaug_core.cli", "train", *train_flags]
    if n == 1 and engine == "ddp":
        return [sys.executable, *train]
    config = CONFIGS["cpu" if tiny else engine]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(n),
            "--main_process_port", str(_free_port()), *train]


def throughput(metrics: Path, warmup_steps: int) -> dict:
    """Tokens/s and seconds per step between the log line of step `warmup_steps` and the last one."""
    recs = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    a = next(r for r in recs if r["step"] == warmup_steps)
    b = recs[-1]
    dt = b["elapsed_s"] - a["elapsed_s"]
    return {"tokens_per_s": (b["tokens_seen"] - a["tokens_seen"]) / dt, "step_s": dt / (b["step"] - a["step"]),
            "measured_steps": b["step"] - a["step"], "final_loss": b["loss"]}


def scaling(runs: list[dict], base_tps: float) -> list[dict]:
    """Efficiency and marginal efficiency of each run against the one-GPU baseline (see the docstring)."""
    out = []
    for engine in dict.fromkeys(r["engine"] for r in runs):
        prev_n, prev_tps = 1, base_tps
        for r in sorted((r for r in runs if r["engine"] == engine and "tokens_per_s" in r), key=lambda r: r["gpus"]):
            n, tps = r["gpus"], r["tokens_per_s"]
            row = {"engine": engine, "gpus": n, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / n,
                   "efficiency": tps / (n * base_tps)}
            if n > prev_n:
                row["marginal_efficiency"] = (tps - prev_tps) / ((n - prev_n) * base_tps)
                prev_n, prev_tps = n, tps
            out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/multigpu.json")
    ap.add_argument("--gpus", default="", help="GPU counts to run (default 1,2,4; 1,2 with --tiny)")
    ap.add_argument("--engines", default="ddp", help="ddp, fsdp or both (ddp,fsdp)")
    ap.add_argument("--warmup-steps", type=int, default=8, help="steps before timing starts (compilation, caches)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--recipe", default=str(RECIPE), help="training config (shape and settings)")
    ap.add_argument("--scratch", default="", help="folder for the decoder, the pack and the runs (default: a temp dir)")
    ap.add_argument("--timeout-s", type=int, default=1800, help="limit per run")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU processes over gloo (smoke test)")
    ap.add_argument("extra", nargs="*", help="more `cacheaug train` flags, after --")
    args = ap.parse_args(argv)
    os.environ.update(NVLS_OFF)  # inherited by every launched process
    # torchrun gives each process one CPU thread unless told otherwise; the one-process baseline
    # gets the same, so the runs differ only in the GPU count
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    gpus = [int(g) for g in (args.gpus or ("1,2" if args.tiny else "1,2,4")).split(",")]
    if not args.tiny:
        have = torch.cuda.device_count()
        if max(gpus) > have:
            sys.exit(f"asked for {max(gpus)} GPUs, this machine has {have}")
    engines = args.engines.split(",")
    if args.tiny and engines != ["ddp"]:
        sys.exit("--tiny runs DDP only: accelerate enables FSDP on accelerators only")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="cacheaug-multigpu-"))
    scratch.mkdir(parents=True, exist_ok=True)
    dec, pack = scratch / "decoder", scratch / "pack"
    if not (dec / "config.json").exists():
        vocab = make_decoder(dec, args.tiny)
        make_pack(pack, vocab, 2_000_000 if args.tiny else 50_000_000)

    total = args.warmup_steps + args.steps
    device = "cpu" if args.tiny else torch.cuda.get_device_name(0)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    argv_used = sys.argv[1:] if argv is None else argv
    recipe = Path(args.recipe).resolve()
    result = {"device": device, "gpus_on_machine": 0 if args.tiny else torch.cuda.device_count(),
              "torch": torch.__version__, "commit": commit or "unknown",
              "command": " ".join(["python", "bench/multigpu_throughput.py", *argv_used]),
              "recipe": str(recipe.relative_to(ROOT)) if recipe.is_relative_to(ROOT) else str(recipe),
              "decoder": "SmolLM2-135M shape, random weights" if not args.tiny else "tiny Llama, random weights",
              "env": NVLS_OFF | {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]},
              "warmup_steps": args.warmup_steps, "timed_steps": args.steps,
              "target_efficiency": TARGET, "runs": []}
    try:
        import accelerate

        result["accelerate"] = accelerate.__version__
    except ImportError:
        pass

    plan = [(1, "ddp")] + [(n, e) for e in engines for n in gpus if not (n == 1 and e == "ddp")]
    for n, engine in plan:
        run_dir = scratch / f"run-{engine}-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        flags = ["--config", args.recipe, "--decoder", str(dec), "--data", str(pack), "--out-dir", str(run_dir),
                 "--steps", str(total), "--eval-every", "0", "--save-every", str(10 * total), "--log-every", "1",
                 *(TINY_FLAGS if args.tiny else []), *args.extra]
        cmd = command(n, engine, flags, args.tiny)
        row = {"engine": "single" if (n == 1 and engine == "ddp") else engine, "gpus": n,
               "command": " ".join(cmd[1:] if cmd[0] == sys.executable else cmd)}
        print(f"== {row['engine']} x{n}: {row['command']}", flush=True)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout_s)
            row["wall_s"] = round(time.time() - t0, 1)
            if p.returncode != 0:
                row["error"] = (p.stdout[-1500:] + "\n" + p.stderr[-3000:]).strip()
            else:
                row |= throughput(run_dir / "metrics.jsonl", args.warmup_steps)
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {args.timeout_s} s"
        print({k: v for k, v in row.items() if k != "command"}, flush=True)
        result["runs"].append(row)

    base = next((r.get("tokens_per_s") for r in result["runs"] if r["engine"] == "single"), None)
    if base:
        multi = [r for r in result["runs"] if r["engine"] != "single"]
        result["baseline_tokens_per_s"] = base
        result["scaling"] = scaling(multi, base)
        checks = [v for s in result["scaling"] if s["gpus"] > 1
                  for v in (s["efficiency"], s.get("marginal_efficiency", s["efficiency"]))]
        # a CPU smoke test says nothing about GPU scaling
        result["meets_target"] = None if args.tiny else bool(checks) and all(v >= TARGET for v in checks)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for s in result.get("scaling", []):
        print(f"{s['engine']:>5} x{s['gpus']}: {s['tokens_per_s']:,.0f} tok/s  efficiency {s['efficiency']:.3f}"
              + (f"  marginal {s['marginal_efficiency']:.3f}" if "marginal_efficiency" in s else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
