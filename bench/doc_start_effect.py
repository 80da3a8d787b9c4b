"""Where does the position-1 gain come from? Per-token NLL of the plain and augmented decoder on the
first documents of a held-out text, split by where the scored token sits in its document.

The paper's protocol scores every document from its first token; the plain decoder predicts
token 1 from token 0 alone (no BOS), where any extra keys (latents, pause tokens) can act as an
attention sink. This splits the relative perplexity change at each ahead position into targets at
document index < K and the rest.

    python bench/doc_start_effect.py --coprocessor runs/gated --coprocessor runs/pause \
        --text data/corpus/heldout/wiki.txt --max-tokens 8000 --positions 4 --json results/doc_start_effect.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cacheaug_core import augment, evaluate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default="data/corpus/heldout/wiki.txt")
    ap.add_argument("--coprocessor", action="append", required=True, help="checkpoint folder (repeat)")
    ap.add_argument("--max-tokens", type=int, default=8000)
    ap.add_argument("--positions", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--split", type=int, default=4, help="K: targets at document index < K vs >= K")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    docs = evaluate.read_documents(args.text)
    out = {"text": args.text, "max_tokens": args.max_tokens, "chunk": args.chunk, "split_K": args.split, "arms": {}}
    for path in args.coprocessor:
        t0 = time.perf_counter()
        wb = evaluate.load_models("", path)
        chunks = evaluate.document_chunks(wb.tokenizer, docs, args.chunk, args.max_tokens)
        A = args.positions
        sums = {k: [[0.0, 0.0, 0] for _ in range(A)] for k in ("early", "rest")}   # aug, base, n
        for d, ids in chunks:
            x = torch.tensor([ids])
            aug, base = augment.score_after_every_token(wb.decoder, wb.coprocessor, x, positions=A)
            for p in range(aug.shape[0]):
                for a in range(A):
                    t = p + a + 1                       # index of the scored token in its chunk
                    if t >= len(ids) or math.isnan(float(aug[p, a])):
                        continue
                    s = sums["early" if t < args.split else "rest"][a]
                    s[0] += float(aug[p, a]); s[1] += float(base[p, a]); s[2] += 1
        rows = {}
        for k, per in sums.items():
            rows[k] = [{"position": a + 1, "tokens": n, "ppl_decoder": math.exp(b / n), "ppl_augmented": math.exp(g / n),
                        "rel_ppl_change_pct": 100 * (math.exp((g - b) / n) - 1)} for a, (g, b, n) in enumerate(per) if n]
        tot = [(sums["early"][a][0] + sums["rest"][a][0], sums["early"][a][1] + sums["rest"][a][1],
                sums["early"][a][2] + sums["rest"][a][2]) for a in range(A)]
        rows["all"] = [{"position": a + 1, "tokens": n, "rel_ppl_change_pct": 100 * (math.exp((g - b) / n) - 1)}
                       for a, (g, b, n) in enumerate(tot)]
        out["arms"][path] = {"rows": rows, "chunks": len(chunks), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"== {path} ({len(chunks)} chunks)")
        for k in ("all", "early", "rest"):
            print(f"  {k:5s}", " ".join(f"pos{r['position']} {r['rel_ppl_change_pct']:+.2f}% (n={r['tokens']})" for r in rows[k]))
    if args.json:
        import platform
        import subprocess

        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent).stdout.strip() or None
        except OSError:
            commit = None
        out["provenance"] = {"command": " ".join(["python"] + sys.argv), "commit": commit,
                             "device": platform.processor() or platform.machine(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
