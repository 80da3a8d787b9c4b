"""Where does the position-1 gain come from? The relative perplexity change by ahead position, split
by where the scored token sits in its document (doc_start: index < 4, body: the rest), under
several sink settings (no start-of-text token, `auto`, a named token), for one or more checkpoints.

Without a sink the plain decoder predicts a document's second token from its first alone, where any
extra keys (latents, pause tokens) can act as an attention sink; `eval ppl` now reads a sink in
every arm by default. This runs `eval.perplexity_by_position` under each setting side by side.

    python bench/doc_start_effect.py --coprocessor assets/coprocessor --coprocessor assets/pause \
        --text data/corpus/heldout/wiki.jsonl --max-tokens 8000 --positions 4 \
        --sink none --sink auto --sink '<|im_start|>' --json results/doc_start_sinks.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cacheaug_core import eval as ev  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True, help=".jsonl of documents (or form-feed separated .txt)")
    ap.add_argument("--coprocessor", action="append", required=True, help="checkpoint folder (repeat)")
    ap.add_argument("--max-tokens", type=int, default=8000)
    ap.add_argument("--positions", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--device", default="")
    ap.add_argument("--sink", action="append", default=None, help="sink settings to compare (repeat; default: "
                    "none and auto), e.g. --sink none --sink auto --sink '<|im_start|>'")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    t00 = time.perf_counter()
    docs = ev.read_documents(args.text)
    out = {"text": args.text, "max_tokens": args.max_tokens, "chunk": args.chunk, "doc_start": ev.DOC_START,
           "arms": {}}
    wb = None
    for path in args.coprocessor:
        wb = ev.load_models("", path, device=args.device)
        per = {}
        for mode in args.sink or ("none", "auto"):
            sink = ev.resolve_sink(wb.tokenizer, mode)
            t0 = time.perf_counter()
            res = ev.perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, docs, args.positions,
                                                  args.chunk, args.max_tokens, n_boot=args.bootstrap,
                                                  sink=sink["token_id"])
            per[mode] = {"sink": sink, "seconds": round(time.perf_counter() - t0, 1),
                         **{k: res[k] for k in ("rel_ppl_change_pct", "rel_ppl_change_pct_doc_start",
                                                "rel_ppl_change_pct_body", "tokens_scored", "tokens_scored_doc_start",
                                                "tokens_scored_body", "ppl_decoder", "ppl_decoder_doc_start",
                                                "ppl_decoder_body", "rel_ppl_change_ci95_body")}}
            print(f"== {path}, sink {sink['token']!r}")
            for k in ("", "_doc_start", "_body"):
                print(f"  {k.strip('_') or 'all':9s}", " ".join(
                    f"pos{i + 1} {v:+.2f}% (n={n})" for i, (v, n) in
                    enumerate(zip(res["rel_ppl_change_pct" + k], res["tokens_scored" + k]))))
        out["arms"][path] = per
    if args.json:
        out["provenance"] = ev.provenance(wb, t00)
        ev.write_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
