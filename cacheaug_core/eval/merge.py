"""Merging a sharded `eval bench` run (`--shard I/N` in N processes) into the result a single run
would give: `cacheaug eval bench-merge b0.json b1.json ... --json bench.json`.

    from cacheaug_core.eval.merge import merge_bench
    res = merge_bench([json.load(open(f)) for f in files], files)
"""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import sys

from .provenance import EvalError
from .stats import task_metrics


def _brief(x, width: int = 160) -> str:
    s = json.dumps(x, sort_keys=True, default=str)
    return s if len(s) <= width else s[: width - 3] + "..."


def _difference(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        return "; ".join(f"{k}: {_brief(b.get(k), 80)} vs {_brief(a.get(k), 80)}" for k in keys)
    return f"{_brief(b)} vs {_brief(a)}"


def _shard_fingerprint(res: dict) -> dict:
    """What must agree between the shards of one run (the settings that change any item's result)."""
    prov = res.get("provenance") or {}
    args = prov.get("arguments") or {}
    tasks = res["tasks"]
    return {
        "tasks": list(tasks), "arms": res.get("arms"), "async_delay": res.get("async_delay"),
        "limit": res.get("limit"), "task types": {t: r.get("type") for t, r in tasks.items()},
        "task sizes (items before sharding)": {t: (r.get("shard") or {}).get("items_total") for t, r in tasks.items()},
        "generation settings": {t: r.get("settings") for t, r in tasks.items() if r.get("settings") is not None},
        "max_new_tokens": args.get("max_new_tokens"), "dtype": prov.get("dtype"),
        "decoder": prov.get("decoder"), "coprocessor": prov.get("coprocessor"), "pause": prov.get("pause"),
        "per-item records (--no-items)": all("items" in r for r in tasks.values()),
    }


def merge_bench(shards: list[dict], names: list[str] | None = None, keep_items: bool = True,
                command_line: str | None = None) -> dict:
    """One `eval bench` result from the JSONs of a sharded run (`--shard 0/N` ... `--shard N-1/N`).

    Checks that the shards belong together: every one a sharded bench result, the same N, each
    index once and all N present, and the same tasks, arms, async delay, limit, task sizes,
    generation settings, max_new_tokens, dtype, decoder, coprocessor and pause arm. Then the
    per-item correctness (and the per-item records, if kept) is put back in item order and every
    metric, Wilson interval and paired-bootstrap delta is recomputed by `task_metrics`, the code
    a single run uses, so the result equals that of the unsharded run. Differences in git commit,
    library versions or device are allowed and listed under provenance.merge.warnings.
    """
    if not shards:
        raise EvalError("bench-merge needs the JSON files of all shards")
    names = list(names) if names else [f"shard file {k + 1}" for k in range(len(shards))]
    for res, f in zip(shards, names):
        if not isinstance(res, dict) or res.get("kind") != "bench" or not isinstance(res.get("tasks"), dict):
            raise EvalError(f"{f}: not an `eval bench` result")
        sh = res.get("shard")
        if not isinstance(sh, dict) or "index" not in sh or "count" not in sh:
            raise EvalError(f"{f}: not a sharded result (made by `eval bench --shard I/N --json ...`)")
    n, f0 = shards[0]["shard"]["count"], names[0]
    by_index: dict[int, int] = {}
    for k, (res, f) in enumerate(zip(shards, names)):
        i, c = res["shard"]["index"], res["shard"]["count"]
        if c != n:
            raise EvalError(f"{f} is shard {i}/{c} but {f0} is shard {shards[0]['shard']['index']}/{n}: "
                            "the shards of one run share N")
        if i in by_index:
            raise EvalError(f"shard {i}/{n} given twice: {names[by_index[i]]} and {f}")
        by_index[i] = k
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        raise EvalError(f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}: "
                        f"got {len(by_index)} of {n} ({', '.join(f'{i}/{n}' for i in sorted(by_index))})")
    order = [by_index[i] for i in range(n)]
    shards, names = [shards[k] for k in order], [names[k] for k in order]
    first, f0 = shards[0], names[0]
    fp0 = _shard_fingerprint(first)
    for res, f in zip(shards[1:], names[1:]):
        fp = _shard_fingerprint(res)
        for key, v0 in fp0.items():
            if fp[key] != v0 and (keep_items or key != "per-item records (--no-items)"):
                raise EvalError(f"{f} does not belong with {f0}: {key} differ ({_difference(v0, fp[key])})")
    arms = list(first["arms"])
    have_items = keep_items and fp0["per-item records (--no-items)"]
    tasks = {}
    for t, r0 in first["tasks"].items():
        total = r0["shard"]["items_total"]
        if not isinstance(total, int) or total < 1:
            raise EvalError(f"{f0}: task {t} records no items_total")
        correct: dict = {}
        items = [None] * total
        for i, (res, f) in enumerate(zip(shards, names)):
            r = res["tasks"][t]
            idx = range(i, total, n)
            if r.get("n") != len(idx) or (have_items and len(r["items"]) != len(idx)):
                raise EvalError(f"{f}: task {t} holds {r.get('n')} items, but shard {i}/{n} of {total} items "
                                f"should hold {len(idx)}")
            for a, per in r["shard"]["correct"].items():
                for key, flags in per.items():
                    if len(flags) != len(idx) or set(flags) - {"0", "1"}:
                        raise EvalError(f"{f}: task {t}, arm {a}, {key}: per-item correctness is malformed")
                    dst = correct.setdefault(a, {}).setdefault(key, [None] * total)
                    for j, x in zip(idx, flags):
                        dst[j] = x == "1"
            if have_items:
                for j, rec in zip(idx, r["items"]):
                    items[j] = rec
        for a, per in correct.items():
            for key, v in per.items():
                if any(x is None for x in v):
                    raise EvalError(f"task {t}, arm {a}, {key}: not every shard records it")
        m = {"type": r0["type"], "n": total, "metrics": task_metrics(arms, correct)}
        if have_items:
            m["items"] = items
        if r0.get("settings") is not None:
            m["settings"] = r0["settings"]
        m["seconds"] = round(sum(res["tasks"][t].get("seconds") or 0 for res in shards), 2)
        tasks[t] = m
    provs = [res.get("provenance") or {} for res in shards]
    warnings = []
    for key in ("git", "versions", "device"):
        vals = [p.get(key) for p in provs]
        if any(v != vals[0] for v in vals):
            warnings.append(f"the shards differ in {key}: "
                            + ", ".join(f"{i}/{n}: {_brief(v, 80)}" for i, v in enumerate(vals)))
    args0 = {k: v for k, v in (provs[0].get("arguments") or {}).items() if k not in ("shard", "json", "md")}
    secs = [float(p.get("seconds") or 0) for p in provs]
    prov = dict(provs[0])
    prov |= {"command_line": command_line if command_line is not None else shlex.join(sys.argv),
             "arguments": args0,
             "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "seconds": round(sum(secs), 2),
             "merge": {"shards": n, "longest_shard_seconds": round(max(secs), 2), "warnings": warnings,
                       "from": [{"file": str(f), "shard": f"{i}/{n}", "command_line": p.get("command_line"),
                                 "seconds": p.get("seconds"), "finished_at": p.get("finished_at"),
                                 "device": p.get("device"), "git": p.get("git")}
                                for i, (f, p) in enumerate(zip(names, provs))]}}
    return {"kind": "bench", "arms": arms, "async_delay": first["async_delay"], "tasks": tasks,
            "limit": first.get("limit"), "provenance": prov}
