"""The `cacheaug eval` subcommands: `eval ppl`, `eval bench` and `eval bench-merge` (registered on the
`cacheaug` command by `register_cli`).

    cacheaug eval ppl --text data/corpus/heldout/wiki.jsonl --json ppl.json [--compare assets/pause] [--extra-keys match]
    cacheaug eval bench --tasks arc_easy,gsm8k --limit 50 --json bench.json --md bench.md \
        [--arms decoder,coprocessor,pause,cot] [--pause DIR] [--async-delay N]
    # the same run in N processes side by side (items i, i+N, ... each), then one merged result:
    for i in 0 1 2 3; do cacheaug eval bench --shard $i/4 --limit 500,gsm8k=200 --json b$i.json & done; wait
    cacheaug eval bench-merge b0.json b1.json b2.json b3.json --json bench.json --md bench.md

Usage errors raise `EvalError`; the `cacheaug` command prints its message and exits with 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from ..decoder import sha256_file as _sha256
from .bench import ALL_TASKS, ARMS, parse_limit, parse_shard, run_bench, shard_items, task_type
from .merge import merge_bench
from .ppl import check_ppl_settings, load_documents, perplexity_by_position, resolve_sink, sink_keys
from .provenance import DTYPES, EvalError, load_models, provenance, write_json
from .tables import results_table_markdown


def _load_task(name: str, limit: int | None):
    from .. import benchmarks

    return benchmarks.load_task(name, limit=limit)


def _model_args(p):
    p.add_argument("--decoder", default="", help="decoder: empty = embedded SmolLM2-135M-Instruct, a folder, or a Hub id")
    p.add_argument("--coprocessor", default="", help="coprocessor checkpoint folder (default: the shipped one)")
    p.add_argument("--device", default="", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _extra_keys(spec: str, cop) -> int:
    """`--extra-keys`: 0 (off), N, or "match" (as many as the coprocessor's latents)."""
    if spec == "match":
        return cop.config.num_latents
    try:
        n = int(spec)
    except ValueError:
        raise EvalError(f"--extra-keys {spec!r}: expected a number or 'match'") from None
    if n < 0:
        raise EvalError("--extra-keys must be >= 0 (0 = no extra-keys arm)")
    return n


def cmd_ppl(args) -> int:
    t0 = time.perf_counter()
    check_ppl_settings(args.positions, args.chunk, args.points_per_pass, args.context)
    if args.extra_keys != "0" and args.sink == "none":
        raise EvalError("--extra-keys inserts copies of the sink token: it needs --sink auto or --sink TOKEN")
    documents = load_documents(args.text)
    if len(documents) == 1 and Path(args.text).suffix != ".jsonl" and "\n\n" in documents[0].text:
        print(f"note: {args.text} is read as one document: separate documents with a line holding only a form "
              "feed (printf '\\f\\n'), or use .jsonl", file=sys.stderr)
    wb = load_models(args.decoder, args.coprocessor, pause=args.compare, device=args.device, dtype=args.dtype)
    if wb.notice:
        print(f"note: {wb.notice}", file=sys.stderr)
    sink = resolve_sink(wb.tokenizer, args.sink)
    others = {}
    if args.compare:
        others["pause"] = wb.pause
    n_keys = _extra_keys(args.extra_keys, wb.coprocessor)
    if n_keys:
        others["extra_keys"] = sink_keys(wb.decoder, wb.coprocessor, n_keys, sink["token_id"])
    res = perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, [d.text for d in documents],
                                 positions=args.positions, chunk=args.chunk, max_tokens=args.max_tokens,
                                 points_per_pass=args.points_per_pass, n_boot=args.bootstrap, seed=args.seed,
                                 progress=not args.no_progress, sink=sink["token_id"], context=args.context,
                                 others=others)
    res["sink"] = sink
    sources = [d.source for d in documents[: res["data"]["documents_read"]] if d.source]
    res["data"] |= {"text_file": str(args.text), "text_sha256": _sha256(args.text),
                    "sources": dict(sorted(Counter(sources).items())) if sources else None}
    if "arms" in res:
        if "pause" in res["arms"]:
            res["arms"]["pause"]["source"] = str(args.compare)
        if "extra_keys" in res["arms"]:
            res["arms"]["extra_keys"]["source"] = f"{n_keys} copies of the sink token {sink['token']!r}"
    res["provenance"] = provenance(wb, t0, args)
    write_json(res, args.json)
    print(results_table_markdown(res))
    print(f"\nJSON: {args.json}")
    return 0


def cmd_bench(args) -> int:
    t0 = time.perf_counter()
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise EvalError(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    if "pause" in arms and not args.pause:
        raise EvalError("--arms pause needs --pause DIR (a coprocessor checkpoint with body 'none')")
    if args.async_delay < 0:
        raise EvalError("--async-delay must be >= 0")
    limits, limit_record = parse_limit(args.limit, tasks)
    shard = parse_shard(args.shard) if getattr(args, "shard", "") else None
    if shard and not args.json:
        raise EvalError("--shard needs --json: `eval bench-merge` reads the shard files")
    items, types, totals = {}, {}, {}
    for t in tasks:   # before the models: a bad task name or missing data fails fast
        try:
            full = _load_task(t, limits[t])
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise EvalError(f"task {t}: {e}") from e
        types[t], totals[t] = task_type(t, full), len(full)
        items[t] = shard_items(full, *shard) if shard else full
    wb = load_models(args.decoder, args.coprocessor, pause=args.pause, device=args.device, dtype=args.dtype)
    if wb.notice:
        print(f"note: {wb.notice}", file=sys.stderr)
    res = run_bench(wb, items, arms, async_delay=args.async_delay, max_new_tokens=args.max_new_tokens,
                    progress=not args.no_progress, keep_items=not args.no_items, types=types,
                    keep_correct=shard is not None, batch_tokens=args.batch_tokens)
    res["limit"] = limit_record
    if shard:
        i, n = shard
        res["shard"] = {"index": i, "count": n}
        for t, r in res["tasks"].items():
            # Per-item correctness as "0"/"1" strings, one character per item of this shard (items
            # i, i+N, i+2N, ... of the task's items_total): what the merge recomputes metrics from.
            r["shard"] = {"items_total": totals[t],
                          "correct": {a: {k: "".join("1" if x else "0" for x in v) for k, v in m.items()}
                                      for a, m in r.pop("correct").items()}}
    res["provenance"] = provenance(wb, t0, args)
    table = results_table_markdown(res)
    if args.json:
        write_json(res, args.json)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")
    print(table)
    if shard:
        print(f"\nshard {shard[0]}/{shard[1]}: metrics of this shard's items only; merge all {shard[1]} with "
              f"`cacheaug eval bench-merge`", file=sys.stderr)
    return 0


def cmd_bench_merge(args) -> int:
    shards = []
    for f in args.files:
        p = Path(f)
        if not p.is_file():
            raise EvalError(f"{f}: no such file")
        try:
            shards.append(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{f}: not a JSON file ({e})") from e
    res = merge_bench(shards, [str(f) for f in args.files], keep_items=not args.no_items)
    for w in res["provenance"]["merge"]["warnings"]:
        print(f"note: {w}", file=sys.stderr)
    table = results_table_markdown(res)
    write_json(res, args.json)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")
    print(table)
    print(f"\nmerged {res['provenance']['merge']['shards']} shards; JSON: {args.json}", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    """Add `eval ppl`, `eval bench` and `eval bench-merge` to the `cacheaug` command."""
    p = subparsers.add_parser("eval", help="perplexity by ahead position; benchmarks with and without latents")
    sub = p.add_subparsers(dest="eval_command", required=True)

    q = sub.add_parser("ppl", help="relative perplexity change by token position, latents after every token (Table 1)")
    q.add_argument("--text", required=True, help=".jsonl (one document a line: 'text', optional 'title' joined in "
                   "front, 'source') or a text file whose documents are separated by form-feed lines")
    q.add_argument("--json", required=True, help="write the result here")
    _model_args(q)
    q.add_argument("--sink", default="auto", help="start-of-text token every arm reads before each document: "
                   "auto (<|endoftext|>, else BOS, else EOS) | none | a token of the vocabulary")
    q.add_argument("--compare", default="", metavar="PAUSE_DIR", help="also score this pause-token checkpoint "
                   "and report the coprocessor-minus-pause difference with paired intervals over documents")
    q.add_argument("--extra-keys", default="0", metavar="N|match", help="also score the decoder given N extra "
                   "copies of the sink token at each augmentation point, where the latents go (match = as "
                   "many as the coprocessor's latents; 0 = off)")
    q.add_argument("--max-tokens", type=int, default=0, help="read whole documents until this many tokens (0 = all)")
    q.add_argument("--positions", type=int, default=32, help="score the n-th token ahead for n = 1..this")
    q.add_argument("--chunk", type=int, default=512, help="tokens per scored window (sink included); longer "
                   "documents are read in windows that carry the text before them")
    q.add_argument("--context", type=int, default=None, help="a long document's later windows carry at least this "
                   "many tokens before their first scored point (default: a quarter of --chunk)")
    q.add_argument("--points-per-pass", type=int, default=64, help="augmentation points per batched decoder pass")
    q.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (over documents) for the 95%% intervals")
    q.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    q.set_defaults(fn=cmd_ppl)

    b = sub.add_parser("bench", help="benchmarks, coprocessor called once at the end of the prompt (Tables 2-4, 8)")
    b.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated: " + ",".join(ALL_TASKS))
    b.add_argument("--limit", default="0", help="first N items of each task (0 = all); or per task: "
                   "'gsm8k=200,mmlu=1000' (the others all), '500,gsm8k=200' (500 by default)")
    b.add_argument("--shard", default="", metavar="I/N", help="evaluate only items whose index (after --limit) "
                   "is I mod N; merge the N JSONs with `eval bench-merge`")
    b.add_argument("--json", default="", help="write the full result (metrics, per-item predictions) here")
    b.add_argument("--md", default="", help="write the markdown table here")
    _model_args(b)
    b.add_argument("--arms", default="decoder,coprocessor", help="comma-separated: " + ",".join(ARMS))
    b.add_argument("--pause", default="", help="pause-token checkpoint (a coprocessor with body 'none')")
    b.add_argument("--async-delay", type=int, default=0, help="insert the latents this many tokens late (Table 8)")
    b.add_argument("--max-new-tokens", type=int, default=256, help="generation tasks: at most this many new tokens")
    b.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batched scoring pass "
                   "(generation: 4x this); lower it if memory runs out, raise it on a large GPU")
    b.add_argument("--no-items", action="store_true", help="leave per-item predictions out of the JSON")
    b.set_defaults(fn=cmd_bench)

    m = sub.add_parser("bench-merge", help="merge the JSONs of `eval bench --shard I/N` runs into one result")
    m.add_argument("files", nargs="+", metavar="SHARD_JSON", help="the JSON of every shard 0/N .. N-1/N")
    m.add_argument("--json", required=True, help="write the merged result here")
    m.add_argument("--md", default="", help="write the markdown table here")
    m.add_argument("--no-items", action="store_true", help="leave per-item predictions out of the JSON")
    m.set_defaults(fn=cmd_bench_merge)
