"""The latent-count sweep's table (docs/ablations.md): one `eval ppl` JSON per latent count N, each
scoring the coprocessor arm nlN against the decoder with its pause-token arm pN (`--compare`), on the
dev set (never on a headline set: the sweep chooses).

    python scripts/sweep_table.py res/sweep_nl8.json res/sweep_nl16.json res/sweep_nl32.json \
        res/sweep_nl64.json --metrics-dir res/sweep --json results/sweep_latents.json --md results/sweep_latents.md

Every number is read from the JSONs (body targets: index >= 4 in their document); `--metrics-dir`
adds each arm's steps and tokens from its `<arm>_metrics.jsonl`. Writes the table as markdown and a
JSON summary (per N: both arms' curves, the paired difference, and the monotonicity checks of the
issue: position 1 better at each step 8 -> 16 -> 32 -> 64).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cacheaug_core.eval.ppl import MEAN_POSITIONS  # noqa: E402
from cacheaug_core.viz.curves import read_metrics  # noqa: E402

SHOW = (1, 2, 4, 8, 16, 32)
M = MEAN_POSITIONS      # the compare result's mean window (its keys are named mean_1_<M>)


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.2f}%" if pct else f"{x:+.2f}"


def _mean(xs, m: int) -> float:
    v = [x for x in xs[:m] if x is not None]
    return sum(v) / len(v)


def _last_train(path: Path) -> dict:
    """The last training record of a metrics.jsonl: step, tokens, elapsed seconds."""
    if not path.is_file():
        return {}
    train = [r for r in read_metrics(path) if "loss" in r and "step" in r]
    return {"steps": train[-1]["step"], "tokens_seen": train[-1].get("tokens_seen"),
            "elapsed_s": train[-1].get("elapsed_s")} if train else {}


def summarise(files: list[Path], metrics_dir: Path | None) -> dict:
    rows = []
    for f in files:
        d = json.loads(f.read_text())
        if d.get("kind") != "ppl":
            raise SystemExit(f"{f}: not an `eval ppl` result")
        n = d["settings"]["num_latents"]
        cop_b = d["rel_ppl_change_pct_body"]
        m = M
        row = {
            "num_latents": n, "file": str(f), "documents": d["documents"], "tokens": d["data"]["tokens_read"],
            "positions": len(cop_b), "coprocessor_body": cop_b, "coprocessor_body_ci95": d["rel_ppl_change_ci95_body"],
            f"coprocessor_mean_1_{m}": _mean(cop_b, m), "coprocessor_worst": max(x for x in cop_b if x is not None),
            "pause_body": None,
            "commit": (d.get("provenance") or {}).get("git"), "device": (d.get("provenance") or {}).get("device"),
            "dtype": (d.get("provenance") or {}).get("dtype"),
        }
        if d.get("compare"):   # the matching pause-token arm (--compare); missing where that arm failed to train
            pause_name, = d["compare"].keys()
            pause = d["arms"][pause_name]
            if pause["num_latents"] != n:
                raise SystemExit(f"{f}: the pause arm has {pause['num_latents']} latents, the coprocessor {n}")
            comp = d["compare"][pause_name]["body"]
            pau_b = pause["rel_ppl_change_pct_body"]
            row |= {"pause_body": pau_b, f"pause_mean_1_{m}": _mean(pau_b, m),
                    "difference_body": comp["difference_pct_points"], "difference_body_ci95": comp.get("ci95"),
                    f"difference_mean_1_{m}": comp[f"mean_1_{m}"],
                    f"difference_mean_1_{m}_ci95": comp.get(f"mean_1_{m}_ci95"),
                    "coprocessor_ahead_at_every_position": all(x is not None and x < 0
                                                               for x in comp["difference_pct_points"])}
        if metrics_dir is not None:
            row["train_coprocessor"] = _last_train(metrics_dir / f"nl{n}_metrics.jsonl")
            row["train_pause"] = _last_train(metrics_dir / f"p{n}_metrics.jsonl")
        rows.append(row)
    rows.sort(key=lambda r: r["num_latents"])
    pos1 = [r["coprocessor_body"][0] for r in rows]
    return {"what": "latent-count sweep on the dev set: relative perplexity change (body targets) by ahead position, "
                    "coprocessor arm nlN and pause-token arm pN trained with the same data, steps and batch",
            "rows": rows,
            "monotone_position_1": all(b < a for a, b in zip(pos1, pos1[1:])),
            "position_1_by_latents": {r["num_latents"]: r["coprocessor_body"][0] for r in rows}}


def markdown(s: dict) -> str:
    rows = s["rows"]
    m = M
    shown = [p for p in SHOW if p <= rows[0]["positions"]]
    head = ("| latents | arm | steps | " + " | ".join(f"pos {p}" for p in shown)
            + f" | mean 1-{m} | worst 1-{rows[0]['positions']} | coprocessor − pause, mean 1-{m} [95% CI] |")
    out = [head, "|" + "---|" * (5 + len(shown)) + "---|"]
    for r in rows:
        ci = r.get(f"difference_mean_1_{m}_ci95")
        diff = (f"{_fmt(r[f'difference_mean_1_{m}'], False)}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
                if r.get("pause_body") is not None else "n/a (no pause arm)")
        for arm, key, tr in (("coprocessor", "coprocessor_body", "train_coprocessor"), ("pause", "pause_body", "train_pause")):
            curve = r[key]
            steps = (r.get(tr) or {}).get("steps", "")
            if curve is None:
                out.append(f"| {r['num_latents']} | {arm} | {steps} | " + " | ".join("n/a" for _ in shown) + " | n/a | n/a | |")
                continue
            out.append(f"| {r['num_latents']} | {arm} | {steps} | " + " | ".join(_fmt(curve[p - 1]) for p in shown)
                       + f" | {_fmt(_mean(curve, m))} | {_fmt(max(curve))} | {diff if arm == 'coprocessor' else ''} |")
    out.append("")
    out.append("Position 1 (coprocessor, body) by latents: " + ", ".join(
        f"{n}: {_fmt(v)}" for n, v in s["position_1_by_latents"].items())
        + f" — monotone (each step better): **{'yes' if s['monotone_position_1'] else 'no'}**.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="eval ppl --compare JSONs, one per latent count")
    ap.add_argument("--metrics-dir", type=Path, default=None, help="folder of <arm>_metrics.jsonl (steps, tokens)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    a = ap.parse_args(argv)
    s = summarise(a.files, a.metrics_dir)
    md = markdown(s)
    if a.json:
        a.json.write_text(json.dumps(s, indent=1) + "\n")
    if a.md:
        a.md.write_text(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
