"""`cacheaug train --fast` itself, timed: the trainer's whole loop (data sampling, the fast path,
fused AdamW, gradient clipping, the NaN checks, logging) at the reference shape of
bench/train_throughput.py, read back from the run's metrics.jsonl.

    python bench/trainer_throughput.py --out results/runs/trainer_throughput.json      # GPU
    python bench/trainer_throughput.py --cuda-graph --out ...                           # GPU, --cuda-graph
    python bench/trainer_throughput.py --tiny --steps 4 --out /tmp/tt.json              # CPU smoke test
    python bench/trainer_throughput.py --decoder-config path/to/decoder --batch 32      # another decoder's shape

bench/train_throughput.py times the fast path's step alone (loss, backward, optimizer step); this
says what a user of the trainer gets. The decoder is SmolLM2-135M-shaped with random weights and a
byte-level tokenizer (throughput depends on shapes, not weights), saved to a temporary folder; the
training text is random printable bytes; the coprocessor a full copy with 16 latents. Every step
is logged; the step time is the median period between the trainer's waits for the GPU over the
steps after `--skip` (the first ones compile); `logged_step_s` is the same from metrics.jsonl's clock.

Where a step's time goes on the host: the trainer waits for the GPU once per step, for a step's
loss and gradient norm (`train._StepNumbers.values`: before taking the step, or with a fused
AdamW in one process after queueing the next step's forward and backward); the bench clocks that
wait. `host_ms`: from the end of one wait to the start of the next (the host's own work:
optimizer step, data, queueing a forward and backward); `wait_ms`: the wait itself. A wait near
zero means the GPU waited for the host instead.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cacheaug_core.config import MLP_KERNELS, CoprocessorConfig, TrainConfig  # noqa: E402
from cacheaug_core.decoder import byte_level_tokenizer  # noqa: E402
from cacheaug_core import train as train_mod  # noqa: E402
from cacheaug_core.train import train  # noqa: E402
from train_throughput import PEAK_BF16, counted_flops, decoder_config  # noqa: E402


def make_decoder(folder: Path, cfg) -> str:
    """A random decoder of `cfg`'s shape (`train_throughput.decoder_config`) + a byte tokenizer, saved."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return str(folder)


def make_text(path: Path, chars: int) -> str:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    out, n = [], 0
    while n < chars:
        w = rng.choice(words)
        out.append(w)
        n += len(w) + 1
    path.write_text(" ".join(out))
    return str(path)


def _summary(xs: list[float]) -> dict | None:
    if not xs:
        return None
    s = sorted(xs)
    return {"median": round(s[len(s) // 2], 2), "min": round(s[0], 2), "max": round(s[-1], 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/runs/trainer_throughput.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the timing (compilation; at least 1)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="tiny model and shapes on CPU (smoke test)")
    ap.add_argument("--decoder-config", default="",
                    help="a decoder of this shape instead of SmolLM2-135M's: a transformers folder or its "
                         "config.json (Llama/Qwen2-style; random weights)")
    ap.add_argument("--cuda-graph", action="store_true", help="train with --cuda-graph (the step replayed as a CUDA graph)")
    ap.add_argument("--mlp", default="auto", choices=MLP_KERNELS, help="train with --mlp (the fast path's MLP kernels)")
    args = ap.parse_args(argv)
    try:
        dec_cfg = decoder_config(args.decoder_config, args.tiny)
    except ValueError as e:
        ap.error(str(e))
    gpu = torch.cuda.is_available()
    T, P, NL, A = (64, 4, 4, 4) if args.tiny else (512, 16, 16, 16)
    B = 2 if args.tiny else args.batch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        decoder = make_decoder(tmp / "decoder", dec_cfg)
        # enough text for every step's batch without repeating much (the data only has to exist)
        text = make_text(tmp / "train.txt", max(200_000, 2 * B * T * (args.steps + 2) // 8))
        cfg = TrainConfig(decoder=decoder, data=text, out_dir=str(tmp / "run"), seq_len=T, points=P, n_ahead=A,
                          batch_size=B, steps=args.steps, warmup=1, lr=1e-5, eval_every=0,
                          save_every=10 ** 9, log_every=1, fast=True, precision="bf16" if gpu else "no",
                          device="" if gpu else "cpu", cuda_graph=args.cuda_graph, mlp=args.mlp)
        marks = []   # (host reached the wait, the wait ended), one per step
        real = train_mod._StepNumbers.values

        def clocked(numbers):
            t = time.perf_counter()
            out = real(numbers)
            marks.append((t, time.perf_counter()))
            return out

        train_mod._StepNumbers.values = clocked
        t0 = time.time()
        try:
            train(cfg, CoprocessorConfig(num_latents=NL), show_progress=False)
        finally:
            train_mod._StepNumbers.values = real
        wall = time.time() - t0
        lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "elapsed_s" in r and "loss" in r]
    skip = max(1, min(args.skip, len(logged) - 1))
    a, b = logged[skip - 1], logged[-1]             # from the end of the last skipped step to the end
    logged_step_s = (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
    # The last wait comes at the final save, right after the last step is queued, not one step
    # later as the others do when checks are deferred: periods are taken between the waits before it.
    timed = marks[skip:-1]
    host = [1e3 * (b_[0] - a_[1]) for a_, b_ in zip(marks[skip - 1:], timed)]
    wait = [1e3 * (b_ - a_) for a_, b_ in timed]
    period = [1e3 * (b_[1] - a_[1]) for a_, b_ in zip(marks[skip - 1:], timed)]
    # one step per wait in the steady state: the median period between waits (the logged clock
    # reads 10 ms steps, and with deferred checks a step is logged while the next one runs)
    step_s = sorted(period)[len(period) // 2] / 1e3 if period else logged_step_s
    gpu_name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu_name), None)
    fl = counted_flops(dec_cfg, B, T, P, NL, A)["per_step"]
    res = {"device": gpu_name, "torch": torch.__version__,
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "command": " ".join(["python"] + sys.argv), "decoder_config": args.decoder_config or "SmolLM2-135M",
           "shape": {"T": T, "points": P, "num_latents": NL, "n_ahead": A},
           "batch": B, "steps": args.steps, "cuda_graph": args.cuda_graph, "mlp": args.mlp, "timed_steps": b["step"] - a["step"], "step_s": step_s,
           "orig_tokens_per_s": B * T / step_s, "frac_bf16_peak": None if peak is None else fl / step_s / peak,
           "skipped_steps_elapsed_s": [r["elapsed_s"] for r in logged[:skip]], "wall_s": wall,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else None,
           "final_loss": logged[-1]["loss"],
           "host_ms": _summary(host), "wait_ms": _summary(wait), "period_ms": _summary(period),
           "logged_step_s": logged_step_s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
