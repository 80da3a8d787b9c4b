"""Time `evaluate.score_requests` (the log-likelihood scoring of `cacheaug eval bench`) on
multiple-choice-shaped requests, without and with an async delay (Table 8), on the default
decoder and the shipped coprocessor.

    python bench/scoring_delay.py --out results/runs/scoring_delay.json        # CPU, ~1 minute

Requests: `--items` items of `--choices` choices each, one random `--context`-token context per
item and random 8-12 token choices (seeded). Each delay is timed `--repeats` times in one process
after a warm-up call; the scores of every call are kept (their sum is printed), so two commits'
runs can be checked for equal scores as well as compared for time. Measured: docs/evaluation.md
("Asynchronous coprocessor").
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cacheaug_core import eval as evaluate  # noqa: E402
from cacheaug_core.workbench import Workbench  # noqa: E402


def requests(items: int, choices: int, context: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(items):
        ctx = [rng.randrange(100, 40000) for _ in range(context)]
        out += [(ctx, [rng.randrange(100, 40000) for _ in range(rng.randrange(8, 13))]) for _ in range(choices)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delays", default="0,2")
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--context", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--coprocessor", default="assets/coprocessor")
    ap.add_argument("--out", default="results/runs/scoring_delay.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wb = Workbench.load(coprocessor=args.coprocessor)
    reqs = requests(args.items, args.choices, args.context)
    arms = {"decoder": None, "coprocessor": wb.coprocessor}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    res = {"commit": commit, "dirty": dirty, "command": " ".join(sys.argv), "threads": args.threads,
           "torch": torch.__version__, "requests": len(reqs), "delays": {}}
    for N in (int(d) for d in args.delays.split(",")):
        evaluate.score_requests(wb.decoder, reqs[: args.choices], arms, async_delay=N)      # warm-up
        times, sums = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = evaluate.score_requests(wb.decoder, reqs, arms, async_delay=N)
            times.append(time.perf_counter() - t)
            sums = {arm: sum(sc.logprobs) for arm, sc in out.items()}
        res["delays"][N] = {"seconds": times, "min_s": min(times), "logprob_sums": sums,
                            "coprocessor_logprobs": out["coprocessor"].logprobs}
        print(f"delay {N}: {min(times):.2f} s (min of {[round(t, 2) for t in times]}), "
              f"summed log-probs {sums}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
