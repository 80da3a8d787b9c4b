"""Benchmarks (the paper's Tables 2, 3, 4 and 8, `cacheaug eval bench`): multiple choice by
log-likelihood and GSM8K-style generation, each arm (decoder, + coprocessor, pause tokens,
zero-shot CoT) on the same items, the coprocessor called once at the end of the prompt; and the
`--limit` / `--shard` helpers.

    from cacheaug_core.eval import load_models, run_bench
    from cacheaug_core.benchmarks import load_task
    wb = load_models(coprocessor="assets/coprocessor", pause="assets/pause")
    res = run_bench(wb, {"arc_easy": load_task("arc_easy", limit=50)}, ["decoder", "coprocessor", "pause"])
"""

from __future__ import annotations

import re
import sys
import time

import numpy as np

from .provenance import EvalError
from .scoring import (GSM8K_STOP, encode_pair, extract_answer, generate_texts, max_positions, prefix_token_id,
                      score_requests)
from .stats import task_metrics


ALL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "mmlu", "lambada", "gsm8k")
ARMS = ("decoder", "coprocessor", "pause", "cot")
COT_SUFFIX = " Let's think step by step."   # Kojima et al.'s zero-shot trigger (Table 4)
TASK_NAMES = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag", "piqa": "PIQA",
              "winogrande": "Winogrande", "boolq": "BoolQ", "mmlu": "MMLU", "lambada": "LAMBADA",
              "gsm8k": "GSM8K"}
ARM_NAMES = {"decoder": "decoder", "coprocessor": "+ coprocessor", "pause": "pause tokens", "cot": "0-shot CoT"}


def arm_coprocessors(wb, arms) -> dict:
    """Arm name -> coprocessor (None = plain decoder) for the arms that need a model call."""
    out = {}
    for a in arms:
        if a not in ARMS:
            raise EvalError(f"unknown arm {a!r}; choose from {', '.join(ARMS)}")
        if a == "decoder" or a == "cot":
            out[a] = None
        elif a == "coprocessor":
            out[a] = wb.coprocessor
        elif a == "pause":
            if getattr(wb, "pause", None) is None:
                raise EvalError("--arms pause needs --pause DIR (a coprocessor checkpoint with body 'none')")
            out[a] = wb.pause
    return out


def fit_context(ctx: list[int], conts: list[list[int]], limit: int) -> list[int]:
    """Drop context tokens from the left so context + longest continuation fit in `limit` positions."""
    room = max(1, limit - max((len(c) for c in conts), default=0))
    return ctx[-room:]


def _latent_span(wb) -> int:
    cops = [c for c in (wb.coprocessor, getattr(wb, "pause", None)) if c is not None]
    return max((c.layout(1).offset + c.config.num_latents for c in cops), default=0)


def evaluate_multiple_choice(wb, items: list[dict], arms, async_delay: int = 0, progress: bool = False,
                             batch_tokens: int = 16384, block: int = 256) -> dict:
    """Zero-/few-shot multiple choice by log-likelihood (lm-eval's protocol), per arm.

    Each choice i is scored as log P(continuation_i | context_i) with item["pairs"][i] when given
    (WinoGrande: the option fills the blank in the context, the rest of the sentence is the shared
    continuation), else (item["context"], choice_i). acc: the choice with the highest summed log-prob;
    acc_norm: highest log-prob divided by the continuation's length in characters (lm-eval's
    acc_norm). A single-choice item (LAMBADA) is correct when its continuation is the greedy decode
    (lm-eval's LAMBADA acc); acc_norm is then the same. The CoT arm does not apply (None).

    The choices of `block` items at a time go to `score_requests` together, which packs them into
    batches of at most `batch_tokens` padded tokens.
    """
    tok, dec = wb.tokenizer, wb.decoder
    model_arms = {a: c for a, c in arm_coprocessors(wb, arms).items() if a != "cot"}
    pid, pad = prefix_token_id(tok), getattr(tok, "pad_token_id", None) or 0
    limit = max_positions(dec) - _latent_span(wb) - max(async_delay, 0)
    correct = {a: [] for a in model_arms}
    correct_norm = {a: [] for a in model_arms}
    records = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="mc", unit="item", file=sys.stderr, leave=False)
    for s in range(0, len(items), block):
        part = items[s: s + block]
        pairs_of = [item.get("pairs") or [[item["context"], c] for c in item["choices"]] for item in part]
        reqs, starts = [], []
        for pairs in pairs_of:
            enc = [encode_pair(tok, c, t, pid) for c, t in pairs]
            conts = [t for _, t in enc]
            starts.append(len(reqs))
            reqs.extend((fit_context(c_ids, conts, limit), t_ids) for c_ids, t_ids in enc)
        sc = score_requests(dec, reqs, model_arms, async_delay=async_delay, pad_id=pad, max_tokens=batch_tokens)
        for j, (item, pairs) in enumerate(zip(part, pairs_of)):
            mine = range(starts[j], starts[j] + len(pairs))
            gold = int(item["gold"])
            rec = {"id": item.get("id"), "gold": gold, "tokens": [len(reqs[i][1]) for i in mine]}
            for a in model_arms:
                lp = np.array([sc[a].logprobs[i] for i in mine])
                greedy = [sc[a].greedy[i] for i in mine]
                if len(mine) == 1:
                    pred = pred_norm = 0 if greedy[0] else -1
                    ok = ok_norm = greedy[0]
                else:
                    norm = lp / np.array([max(len(t), 1) for _, t in pairs])   # per character of the continuation
                    pred, pred_norm = int(np.argmax(lp)), int(np.argmax(norm))
                    ok, ok_norm = pred == gold, pred_norm == gold
                correct[a].append(bool(ok))
                correct_norm[a].append(bool(ok_norm))
                rec[a] = {"pred": pred, "pred_norm": pred_norm, "logprobs": [round(float(x), 4) for x in lp]}
            records.append(rec)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    per_item = {a: {"acc": correct[a], "acc_norm": correct_norm[a]} for a in model_arms}
    return {"type": "multiple_choice", "n": len(items), "metrics": task_metrics(arms, per_item), "items": records,
            "_correct": per_item}


def evaluate_generation(wb, items: list[dict], arms, async_delay: int = 0, max_new_tokens: int = 256,
                        stop=GSM8K_STOP, progress: bool = False, batch_tokens: int = 65536) -> dict:
    """GSM8K-style generation: greedy decoding from the (few-shot) prompt, cut at the item's "stop"
    strings (else `stop`), exact match of the final number (`extract_answer` on both the completion
    and the gold answer). Arms: decoder; + coprocessor / pause (called once at the end of the
    prompt, or `async_delay` tokens late); cot = the plain decoder with COT_SUFFIX appended.
    Each arm generates for all items in batches of at most `batch_tokens` (prompt + new) tokens."""
    tok, dec = wb.tokenizer, wb.decoder
    cops = arm_coprocessors(wb, arms)
    limit = max_positions(dec) - _latent_span(wb) - max_new_tokens
    golds = [extract_answer(str(item["answer"])) for item in items]
    stops = [tuple(item.get("stop") or stop) for item in items]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items) * len(arms), desc="gen", unit="item", file=sys.stderr, leave=False)
    texts = {}
    for a in arms:
        prompts = [item["prompt"].rstrip() + COT_SUFFIX if a == "cot" else item["prompt"] for item in items]
        ids = [tok.encode(p, add_special_tokens=False)[-max(limit, 1):] for p in prompts]
        texts[a] = generate_texts(dec, tok, cops[a], ids, max_new_tokens, stops, async_delay, batch_tokens, bar)
    if bar is not None:
        bar.close()
    correct = {a: [] for a in arms}
    records = []
    for j, item in enumerate(items):
        rec = {"id": item.get("id"), "gold": golds[j]}
        for a in arms:
            pred = extract_answer(texts[a][j])
            correct[a].append(pred is not None and pred == golds[j])
            rec[a] = {"pred": pred, "correct": correct[a][-1], "text": texts[a][j]}
        records.append(rec)
    per_item = {a: {"exact_match": correct[a]} for a in arms}
    return {"type": "generation", "n": len(items), "metrics": task_metrics(arms, per_item), "items": records,
            "settings": {"max_new_tokens": max_new_tokens, "stop": list(stop), "decoding": "greedy",
                         "cot_suffix": COT_SUFFIX}, "_correct": per_item}


def task_type(name: str, items: list[dict]) -> str:
    """"multiple_choice" (items with "choices") or "generation" (items with "prompt")."""
    if not items:
        raise EvalError(f"task {name} has no items")
    if "choices" in items[0]:
        return "multiple_choice"
    if "prompt" in items[0]:
        return "generation"
    raise EvalError(f"task {name}: items have neither 'choices' nor 'prompt'")


def run_bench(wb, tasks: dict[str, list[dict]], arms=("decoder", "coprocessor"), async_delay: int = 0,
              max_new_tokens: int = 256, progress: bool = False, keep_items: bool = True,
              types: dict[str, str] | None = None, keep_correct: bool = False, batch_tokens: int = 16384) -> dict:
    """Every task through every arm. tasks: name -> items (multiple choice {"context", "choices",
    "gold"} or generation {"prompt", "answer"}, as `benchmarks.load_task` returns them).

    types: name -> task type, for tasks whose item list may be empty (a shard of a small task);
    keep_correct: keep each task's per-item correctness as r["correct"][arm][metric] (what
    `merge_bench` recomputes the metrics from); batch_tokens: padded tokens per batched pass (multiple
    choice; generation batches take 4x as many, most of a decode step's cost is fixed)."""
    res = {"kind": "bench", "arms": list(arms), "async_delay": async_delay, "tasks": {}}
    for name, items in tasks.items():
        kind = (types or {}).get(name) or task_type(name, items)
        t0 = time.perf_counter()
        if kind == "multiple_choice":
            r = evaluate_multiple_choice(wb, items, arms, async_delay, progress, batch_tokens=batch_tokens)
        else:
            r = evaluate_generation(wb, items, arms, async_delay, max_new_tokens, progress=progress,
                                    batch_tokens=4 * batch_tokens)
        r["seconds"] = round(time.perf_counter() - t0, 2)
        correct = r.pop("_correct")
        if keep_correct:
            r["correct"] = correct
        if not keep_items:
            r.pop("items")
        res["tasks"][name] = r
        if progress:
            print(_task_line(name, r), file=sys.stderr)
    return res


def _task_line(name: str, r: dict) -> str:
    key = "acc" if r["type"] == "multiple_choice" else "exact_match"
    vals = [f"{a}={m[key]['value'] * 100:.1f}" for a, m in r["metrics"].items() if m is not None]
    return f"{name}: n={r['n']} {key} " + " ".join(vals) + f" ({r['seconds']}s)"


def parse_limit(spec, tasks) -> tuple[dict[str, int | None], int | dict | None]:
    """`--limit`: "N" = the first N items of every task; "task=N,task2=M" = of those tasks, the
    others whole; "N,task=M" = N by default and M for that task. 0 = all.

    Returns (task -> limit or None for all, the result's "limit": N or null for the plain form,
    else {task: N or null} for every task)."""
    spec = str(spec if spec is not None else "").strip()
    default, per, plain, seen_default = 0, {}, True, False
    for part in (x.strip() for x in spec.split(",")):
        if not part:
            continue
        name, eq, num = part.partition("=")
        if not eq:
            name, num = "", name
        name = name.strip()
        try:
            n = int(num.strip())
        except ValueError:
            raise EvalError(f"--limit {spec!r}: {part!r} is neither N nor task=N") from None
        if n < 0:
            raise EvalError(f"--limit {spec!r}: {part!r} is negative (0 = all items)")
        if not eq:
            if seen_default:
                raise EvalError(f"--limit {spec!r}: more than one default N")
            default, seen_default = n, True
            continue
        plain = False
        if name not in tasks:
            raise EvalError(f"--limit {spec!r} names {name!r}, which is not in --tasks ({','.join(tasks)})")
        if name in per:
            raise EvalError(f"--limit {spec!r} names {name!r} twice")
        per[name] = n
    limits = {t: per.get(t, default) or None for t in tasks}
    return limits, ((default or None) if plain else limits)


def parse_shard(spec: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not m:
        raise EvalError(f"--shard {spec!r}: expected I/N, e.g. 0/8 (shard I of N, counted from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise EvalError(f"--shard {spec}: need 0 <= I < N")
    return i, n


def shard_items(items: list, index: int, count: int) -> list:
    """The items of shard index/count: those whose position in the task's list is index mod count."""
    return items[index::count]
