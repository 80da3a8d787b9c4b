"""The document-protocol report of one coprocessor (results/ppl_protocol.md) from its `eval ppl` JSONs,
and optionally the same numbers into the checkpoint's card (config.json evaluation + status, README.md).

    python scripts/protocol_report.py --out results/ppl_protocol.md \
        --set wiki=headline:results/ppl_wiki_shipped.json --set lambada=headline:results/ppl_lambada_shipped.json \
        --set sciq=headline:results/ppl_sciq_shipped.json --set dev=dev:results/ppl_dev_shipped.json \
        --set indist=indist:results/ppl_indist_shipped.json --device "one H100, bf16" --commit 39a1ad5 \
        --checkpoint assets/coprocessor

Every number is read from the JSONs (written by `eval ppl --compare PAUSE --extra-keys match`, e.g.
through scripts/gpu_protocol.sh); `--commit` records the code's commit where the JSON's provenance
could not (a copy of the checkout without its history). With `--checkpoint`, the headline sets'
tables replace the checkpoint's perplexity entries (the app reads their body columns for its status
line) and its status sentence is rebuilt from the same numbers; the weights are not touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cacheaug_core.eval.ppl import MEAN_POSITIONS  # noqa: E402
from cacheaug_core.eval.tables import results_table_markdown  # noqa: E402

TITLES = {"wiki": "Wikipedia lead sections", "lambada": "LAMBADA passages", "sciq": "SciQ science passages",
          "dev": "CoQA stories (dev)", "indist": "In-distribution sample"}
M = MEAN_POSITIONS      # the compare result's mean window (its keys are named mean_1_<M>)


def _mean(x, m=M) -> float:
    return float(np.nanmean(np.array(x[:m], dtype=float)))


def row(name: str, role: str, d: dict) -> dict:
    """The summary numbers of one set."""
    b = d["rel_ppl_change_pct_body"]
    out = {"set": name, "role": role, "title": TITLES.get(name, name), "documents": d["documents"],
           "tokens": d["data"]["tokens_read"], "positions": len(b),
           "mean_all": _mean(d["rel_ppl_change_pct"]), "mean_body": _mean(b), "pos1_body": b[0],
           "pos16_body": b[min(15, len(b) - 1)], "last_body": b[-1], "worst_body": float(np.nanmax(b)),
           "every_position_lower": bool(np.all(np.array(b, dtype=float) < 0))}
    arms = d.get("arms") or {}
    if "pause" in arms:
        c = d["compare"]["pause"]["body"]
        out |= {"pause_mean_body": _mean(arms["pause"]["rel_ppl_change_pct_body"]),
                "diff_pause": c[f"mean_1_{M}"], "diff_pause_ci": c.get(f"mean_1_{M}_ci95"),
                "ahead_of_pause_at_every_position": bool(np.all(np.array(c["difference_pct_points"]) < 0))}
    if "extra_keys" in arms:
        out["extra_keys_mean"] = _mean(arms["extra_keys"]["rel_ppl_change_pct"])
    return out


def summary_table(rows: list[dict]) -> str:
    n = rows[0]["positions"]
    lines = [f"| set | role | documents | tokens | mean 1-{M} (all) | mean 1-{M} (body) | pos 1 body | pos 16 body "
             f"| pos {n} body | worst 1-{n} body | coprocessor − pause, body, mean 1-{M} [95% CI] | pause body mean 1-{M} "
             f"| extra keys mean 1-{M} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ci = r.get("diff_pause_ci")
        diff = f"{r['diff_pause']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "n/a"
        lines.append(f"| {r['title']} | {r['role']} | {r['documents']:,} | {r['tokens']:,} | {r['mean_all']:+.2f}% | "
                     f"**{r['mean_body']:+.2f}%** | {r['pos1_body']:+.2f}% | {r['pos16_body']:+.2f}% | "
                     f"{r['last_body']:+.2f}% | {r['worst_body']:+.2f}% | {diff} | "
                     f"{r.get('pause_mean_body', float('nan')):+.2f}% | {r.get('extra_keys_mean', float('nan')):+.2f}% |")
    return "\n".join(lines)


def status(rows: list[dict], steps_tokens: str) -> str:
    """The checkpoint's status sentence, every number from the rows."""
    head = [r for r in rows if r["role"] == "headline"]
    per = ", ".join(f"{r['title'].split()[0]} {r['mean_body']:+.2f}%" for r in head)
    ahead = [r for r in head if r.get("diff_pause_ci") and r["diff_pause_ci"][1] < 0]
    tied = [r for r in head if r.get("diff_pause_ci") and r["diff_pause_ci"][1] >= 0]
    names = ", ".join(r["title"].split()[0] for r in ahead)
    diffs = ", ".join(f"{r['diff_pause']:+.2f}" for r in ahead)
    lead = (f"ahead of the pause-token baseline on {names} (body mean {diffs} points, 95% intervals below zero)"
            if ahead else "not ahead of the pause-token baseline on any headline set")
    if tied:
        lead += f", within noise of it on {', '.join(r['title'].split()[0] for r in tied)}"
    return (f"{steps_tokens} Its perplexity by ahead position is measured with the document protocol of "
            "docs/evaluation.md: whole documents, the same start-of-text token in every arm, the body targets "
            "(index >= 4 in their document) as the headline, beside the pause-token baseline and an extra-keys "
            f"control (results/ppl_protocol.md, {min(r['tokens'] for r in head) // 1000}k+ tokens per headline set, positions "
            f"1-{head[0]['positions']}): body mean over positions 1-{M} {per}; {lead}. The dev set (CoQA) is the "
            "one choices are made on. The figures published earlier came from a protocol that split titles from "
            "their documents, read no start token, used templated BIG-bench examples as in-distribution text and "
            "took its headline from the set used for model selection; they and the reasons are in "
            "docs/superseded_results.md.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", required=True, metavar="NAME=ROLE:JSON",
                    help="one evaluated set (role: headline, dev or indist), in the order to report")
    ap.add_argument("--out", type=Path, required=True, help="the markdown report")
    ap.add_argument("--device", default="", help="where it ran, as it should read in the report")
    ap.add_argument("--commit", default="", help="the code's commit, if the JSONs' provenance lacks it")
    ap.add_argument("--command", default="", help="the command that produced the JSONs")
    ap.add_argument("--checkpoint", type=Path, default=None, help="also update this checkpoint's card")
    a = ap.parse_args(argv)
    sets = []
    for s in a.set:
        name, rest = s.split("=", 1)
        role, path = rest.split(":", 1)
        sets.append((name, role, Path(path), json.loads(Path(path).read_text())))
    rows = [row(n, r, d) for n, r, _, d in sets]
    parts = ["# The shipped coprocessor under the document protocol", "",
             "Whole documents, every arm reading `<|endoftext|>` before each document, latents after every token, "
             "the n-th token ahead scored (docs/evaluation.md). Arms on the same windows: the coprocessor, its "
             "pause-token baseline (same layout, data and budget) and the extra-keys control (as many copies of "
             "`<|endoftext|>` as latents where the latents go, behind the coprocessor's learned gate). Paired 95% "
             "intervals: bootstrap over documents. Roles: headline sets are never trained on and never chosen on; "
             "dev is the set the trainer monitors and choices are made on; indist samples the training sources "
             "(its documents are long, so few of them fill its budget and its intervals are wide).", "",
             f"Run: {a.device}; code at commit {a.commit or 'see each JSON'}."
             + (f" Command: `{a.command}`." if a.command else ""), "",
             f"## Summary (negative = the latents lower perplexity; body = targets at index >= 4 in their document)",
             "", summary_table(rows), ""]
    for (name, role, path, d), r in zip(sets, rows):
        parts += [f"## {r['title']} ({role}; `{path}`)", "", results_table_markdown(d), ""]
    a.out.write_text("\n".join(parts))
    print(summary_table(rows))
    if a.checkpoint is not None:
        from cacheaug_core.checkpoint import model_card

        cfg_path = a.checkpoint / "config.json"
        cfg = json.loads(cfg_path.read_text())
        ev = {k: v for k, v in (cfg.get("evaluation") or {}).items() if "document protocol" not in k}
        new = {f"{r['title']} ({role} set, document protocol)": results_table_markdown(d)
               for (name, role, path, d), r in zip(sets, rows) if role == "headline"}
        cfg["evaluation"] = new | ev            # the headline sets first: the app's status line reads the first
        tr = cfg.get("training") or {}
        steps = tr.get("steps")
        tokens = tr.get("tokens_seen")
        lead = (f"Trained {steps:,} steps" + (f" ({tokens / 1e6:.0f}M tokens)." if tokens else ".")) if steps else ""
        cfg["status"] = status(rows, lead)
        cfg_path.write_text(json.dumps(cfg, indent=1) + "\n")
        (a.checkpoint / "README.md").write_text(model_card(cfg))
        print(f"updated {cfg_path} and its README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
