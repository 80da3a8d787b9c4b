"""Held-out evaluation sets of a built corpus: sampling, the in-distribution mix, the training guard
and the 13-gram overlap report.

The roles are declared once, in `sources.HELDOUT_SETS`:

    dev       heldout/dev.jsonl      CoQA stories; the trainer monitors it, ablations choose on it
    headline  heldout/wiki.jsonl     Wikipedia lead sections (title and summary are one document)
              heldout/lambada.jsonl  LAMBADA passages
              heldout/sciq.jsonl     SciQ science passages
    indist    heldout/indist.jsonl   held-out documents of the training sources, evenly across them
                                     (whole tasks for templated sources such as BIG-bench)

`cacheaug prepare-data` builds them (`--heldout-only` builds just these, next to whatever training
shards the folder already has). Each line of a set is one document: `{"text", "source", "title"?}`,
where `text` is the whole document (a Wikipedia title is its first line; `title` is only metadata).
`heldout/full/<name>.jsonl` keeps every document of a set's source: training text is decontaminated
and hash-checked against the full source, not only against the evaluated sample.

    from cacheaug_core.heldout import training_guard
    training_guard("data/corpus").check(texts, "my.jsonl")    # DataError if a text is a held-out document
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import data as D
from . import sources as S
from .data import (MIN_DOC_CHARS, NGRAM, DataError, NgramIndex, _dedup_key, _encode,
                   _packages_info, _write_heldout, doc_hash)

HELDOUT_TOKENS = 120_000        # tokens per evaluated set: >= 60k scored tokens at 32 positions with room
SMALL_HELDOUT_TOKENS = 20_000   # per set in `prepare-data --small`
TASK_HELDOUT_PERCENT = 5        # share of a templated source's tasks held out whole (tasks are few)
OVERLAP_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Refusing held-out data as training data


def refuse_names(names: Iterable[str], where: str) -> None:
    """One-line DataError if a name is a held-out set ("dev") or a held-out source ("coqa")."""
    for n in names:
        h = S.heldout_role(str(n))
        if h is not None:
            raise DataError(f"{where} names {n!r}, the held-out {h.role} set {h.name!r} "
                            f"(heldout/{h.name}.jsonl): held-out sets are never training data")


class TrainingGuard:
    """Normalised-text hashes of every document of the held-out sources of a corpus."""

    def __init__(self, keys: dict[int, str]):
        self.keys = keys

    def check_one(self, text: str, what: str) -> None:
        """DataError "<what> is a document of the held-out <role> set <name>" if it is one."""
        name = self.keys.get(_dedup_key(text)) if self.keys else None
        if name is not None:
            h = S.HELDOUT_SETS[name]
            raise DataError(f"{what} is a document of the held-out {h.role} set {name!r}; "
                            "held-out sets are never training data")

    def check(self, texts: Iterable[str], what: str, unit: str = "document") -> None:
        if self.keys:
            for i, t in enumerate(texts):
                self.check_one(t, f"{what}: {unit} {i}")


def training_guard(corpus: str | os.PathLike, lines: bool = False) -> TrainingGuard:
    """The guard for the held-out sets built in `corpus` (empty when it has none). With `lines`, every
    line of a held-out document of MIN_DOC_CHARS or more is guarded too, so a copy cut differently
    (a Wikipedia summary apart from its title) is still recognised."""
    keys: dict[int, str] = {}
    for name, h in S.HELDOUT_SETS.items():
        p = Path(corpus) / "heldout" / "full" / f"{name}.jsonl"
        if h.source and p.exists():
            with open(p) as f:
                for line in f:
                    text = json.loads(line)["text"]
                    keys.setdefault(_dedup_key(text), name)
                    for line in (text.splitlines() if lines else ()):
                        if len(line.strip()) >= MIN_DOC_CHARS:
                            keys.setdefault(_dedup_key(line), name)
    return TrainingGuard(keys)


def _jsonl_texts(text: str) -> Iterator[str]:
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            yield rec["text"]


def check_training_path(path: str | os.PathLike) -> None:
    """Refuse `--data` pointing at a held-out file of a corpus (heldout/<set>.{jsonl,txt,bin}), and a
    text file any of whose lines (or jsonl `text`s) is a held-out document or a line of one, of the
    corpus it sits in or of ./data/corpus."""
    p = Path(path).resolve()
    if p.is_dir():
        return
    stem = p.name.split(".")[0]
    corpus = next((c for c in p.parents if (c / "manifest.json").exists() or (c / "heldout" / "full").is_dir()), None)
    in_heldout = corpus is not None and "heldout" in p.relative_to(corpus).parts[:-1]
    if in_heldout and (stem in S.HELDOUT_SETS or (p.parent.name == "indist")):
        h = S.HELDOUT_SETS.get(stem, S.HELDOUT_SETS["indist"])
        raise DataError(f"--data {path} is the held-out {h.role} set {h.name!r}: held-out sets are never training data")
    guard_dir = corpus or Path("data/corpus")
    if (guard_dir / "heldout" / "full").is_dir():
        text = p.read_text(encoding="utf-8", errors="replace")
        guard = training_guard(guard_dir, lines=True)
        texts = list(_jsonl_texts(text)) if p.suffix == ".jsonl" else [text]
        if p.suffix == ".jsonl":
            guard.check(texts, f"--data {path}", "record")
        guard.check((line for t in texts for line in t.splitlines() if line.strip()), f"--data {path}", "line")


# ---------------------------------------------------------------------------------------------
# Building a set from its source


def heldout_records(src: S.Source, files: dict[str, Path]) -> Iterator[dict]:
    """Cleaned, de-duplicated documents of a held-out source as {"text", "source", ...}; a document is
    never split (a held-out document is a unit of evaluation)."""
    seen: set[int] = set()
    for rec in src.extract(files):
        rec = {"text": rec} if isinstance(rec, str) else dict(rec)
        text = S.normalize(rec.pop("text"))
        k = _dedup_key(text)
        if len(text) < MIN_DOC_CHARS or k in seen:
            continue
        seen.add(k)
        yield {"text": text, **({"title": rec.pop("title")} if rec.get("title") else {}), "source": src.name,
               **{k2: v for k2, v in rec.items() if v is not None}}


def sample_by_hash(docs: list[dict], lengths: list[int], budget: int | None) -> list[int]:
    """Indices of whole documents in the order of their text hash (a fixed pseudo-random order, so
    every prefix of the set is a sample of the whole source), until `budget` tokens are reached."""
    order = sorted(range(len(docs)), key=lambda i: doc_hash(docs[i]["text"]))
    if budget is None:
        return order
    out, n = [], 0
    for i in order:
        if n >= budget:
            break
        out.append(i)
        n += lengths[i]
    return out


def build_source_set(out: Path, name: str, backend, budget: int | None) -> dict:
    """heldout/full/<name>.jsonl (every document of the source) and heldout/<name>.{jsonl,txt,bin,idx.npy}
    (the evaluated sample: whole documents by text hash up to `budget` tokens)."""
    h = S.HELDOUT_SETS[name]
    src = S.SOURCES[h.source]
    files = S.fetch_source(src)
    docs = list(heldout_records(src, files))
    if not docs:
        raise DataError(f"held-out source {src.name} gave no documents")
    lengths = [len(ids) for i in range(0, len(docs), 512) for ids in _encode(backend, [d["text"] for d in docs[i:i + 512]])]
    full = out / "heldout" / "full"
    full.mkdir(parents=True, exist_ok=True)
    with open(full / f"{name}.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    picked = [docs[i] for i in sample_by_hash(docs, lengths, budget)]
    info = _write_heldout(out, name, picked, backend)
    info.update(name=name, role=h.role, source=src.name, description=h.description, licence=src.licence,
                packages=_packages_info(src, files), fetch=src.fetch_commands,
                source_documents=len(docs), source_tokens=int(sum(lengths)), budget_tokens=budget,
                sampling="whole documents in text-hash order up to budget_tokens; heldout/full has them all")
    return info


def balanced_indist(pools: dict[str, list[dict]], backend, budget: int) -> tuple[list[dict], dict]:
    """The in-distribution set: each training source gets an equal share of `budget` tokens (whole
    documents in text-hash order, at least one), and the sources are interleaved round-robin so any
    prefix of the set is balanced too. Returns the documents and {source: {documents, tokens}}."""
    pools = {s: p for s, p in pools.items() if p}
    if not pools:
        return [], {}
    share = budget / len(pools)
    picked: dict[str, list[dict]] = {}
    stats = {}
    for s, docs in pools.items():
        lengths = [len(ids) for ids in _encode(backend, [d["text"] for d in docs])]
        idx = sample_by_hash(docs, lengths, max(1, int(share)))
        picked[s] = [docs[i] for i in idx]
        stats[s] = {"documents": len(idx), "tokens": int(sum(lengths[i] for i in idx)), "pool_documents": len(docs)}
    out = []
    for k in range(max(len(v) for v in picked.values())):
        out += [v[k] for v in picked.values() if k < len(v)]
    return out, stats


def held_in(src: S.Source, unit: str, text: str) -> bool:
    """Whether a training document goes to the in-distribution held-out pool: by text hash, or for a
    source split by task, by the hash of its task (every example of a held-out task)."""
    if src.split_by == "task":
        return doc_hash(unit) % 100 < TASK_HELDOUT_PERCENT
    return doc_hash(text) % 100 < D.HELDOUT_PERCENT


# ---------------------------------------------------------------------------------------------
# 13-gram overlap of the held-out sets with the training shards


def _training_docs(out: Path, info: dict, eos: int, backend, batch: int = 256) -> Iterator[list[str]]:
    """The training documents of one source, decoded back from its shards (what training reads)."""
    ids = np.concatenate([np.fromfile(out / sh["path"], dtype=np.uint16) for sh in info["shards"]] or
                         [np.zeros(0, np.uint16)])
    cuts = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1]) if len(cuts) else np.zeros(0, np.int64)
    for i in range(0, len(cuts), batch):
        seqs = [ids[a:b].tolist() for a, b in zip(starts[i:i + batch], cuts[i:i + batch])]
        yield backend.decode_batch(seqs, skip_special_tokens=False)


def overlap_report(out: Path, sets: dict[str, list[dict]], source_info: dict[str, dict], eos: int, backend,
                   progress: bool = False) -> dict:
    """For each held-out set: the fraction of its distinct word 13-grams (the decontamination's
    n-grams) that occur anywhere in the training shards, per training source, and for the headline
    sets the fraction shared with the dev set. The indist set is also broken down by its sources."""
    parts: dict[str, list[str]] = {}
    n_indist = len({d["source"] for d in sets.get("indist", [])})
    for name, docs in sets.items():
        # indist per training source when the index's 64 set bits allow it, else as one set
        if name == "indist" and len(sets) - 1 + n_indist <= 64:
            for d in docs:
                parts.setdefault(f"indist:{d['source']}", []).append(d["text"])
        else:
            parts[name] = [d["text"] for d in docs]
    index = NgramIndex(parts)
    bit = {n: np.uint64(1) << np.uint64(i) for i, n in enumerate(index.names)}
    seen_by = {}
    t0 = time.time()
    for src, info in source_info.items():
        seen = np.zeros(len(index.table), dtype=bool)
        for texts in _training_docs(out, info, eos, backend):
            for t in texts:
                h = index.hashes(t)
                if not len(h) or not len(index.table):
                    continue
                j = np.searchsorted(index.table, h)
                j[j >= len(index.table)] = 0
                seen[j[index.table[j] == h]] = True
        seen_by[src] = seen
        if progress:
            print(f"[cacheaug] overlap: {src} read ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    any_seen = np.logical_or.reduce(list(seen_by.values())) if seen_by else np.zeros(len(index.table), bool)

    def frac(mask: np.ndarray, seen: np.ndarray) -> float:
        return round(float(seen[mask].sum() / max(1, mask.sum())), 6)

    def member(names: list[str]) -> np.ndarray:
        m = np.uint64(0)
        for n in names:
            m |= bit[n]
        return (index.masks & m) != 0

    report = {}
    for name in sets:
        names = [n for n in index.names if n == name or n.startswith(f"{name}:")]
        if not names:
            continue
        m = member(names)
        r = {"ngrams": int(m.sum()), "seen_in_training": frac(m, any_seen),
             "by_training_source": {s: f for s, f in ((s, frac(m, v)) for s, v in seen_by.items()) if f > 0}}
        if name == "indist" and names != ["indist"]:
            r["by_indist_source"] = {n.split(":", 1)[1]: frac(member([n]), any_seen) for n in names}
        elif name != "dev" and "dev" in bit:
            r["shared_with_dev"] = frac(m, member(["dev"]))
        report[name] = r
    return {"ngram": NGRAM, "unit": "distinct lower-cased word 13-grams of the set", "version": OVERLAP_VERSION,
            "sets": report, "seconds": round(time.time() - t0, 1)}
