"""A user's own corpus: documents from text, jsonl/json, parquet, csv, a dataset folder or the Hub.

Every format is read through the `datasets` library (its json/parquet/csv/text builders, streamed,
so nothing is copied into its cache); what this module adds is the choice of builder, a refusal of
binary or unknown files in one line, and the text column check. Then documents are tokenised into
a corpus folder that `TokenData` (data.py) and `cacheaug train --data DIR` read:

    cacheaug tokenize notes.jsonl --out data/mine                          # the "text" field
    cacheaug tokenize table.parquet --text-column body --out data/mine --decoder Qwen/Qwen2.5-0.5B
    cacheaug tokenize my_saved_dataset/ --out data/mine                    # Dataset.save_to_disk folder
    cacheaug tokenize user/dataset --split train --max-documents 100000 --out data/mine   # Hub, streamed

    docs, origin = read_documents("notes.jsonl")       # an iterator of strings, and where they came from
    manifest = tokenize_corpus("notes.jsonl", "data/mine", tokenizer)

Plain text files (.txt, .md, .rst or any UTF-8 file without a known extension) are one document
per file (`sample_by="document"`); "paragraph" splits at blank lines, "line" takes each line. A
glob (`"docs/*.jsonl"`) reads several files of one format. The corpus holds token shards (uint16,
or uint32 past 65,536 tokens), the held-out set `heldout/indist` (1% of the documents by text
hash), and a manifest recording the tokenizer's fingerprint (checked when training loads it) and
the origin of the documents. Unlike `prepare-data`, a user's corpus is not decontaminated against
the benchmarks: the manifest says so.
"""

from __future__ import annotations

import glob as _glob
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import (HELDOUT_PERCENT, DataError, ShardWriter, _backend, _encode, _progress, _write_heldout, _write_json,
                   doc_hash, token_dtype)

# extension -> `datasets` builder; compressed variants (.jsonl.gz, ...) are read by the same builder
BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
            ".tsv": "csv", ".txt": "text", ".text": "text", ".md": "text", ".rst": "text"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
SAMPLE_BY = ("document", "paragraph", "line")
# magic numbers of files that are not text: named in the refusal, so a user sees what they gave
_MAGIC = {b"PAR1": "a parquet file", b"\x1f\x8b": "gzip data", b"PK\x03\x04": "a zip archive",
          b"\x89PNG": "a PNG image", b"%PDF": "a PDF", b"\x7fELF": "an executable", b"ARROW1": "an Arrow file",
          b"\x93NUMPY": "a numpy array", b"\x80\x04": "a pickle", b"\x28\xb5\x2f\xfd": "zstd data",
          b"BZh": "bzip2 data", b"\xfd7zXZ": "xz data", b"GGUF": "a GGUF model"}
KNOWN = "a text, jsonl/json, parquet or csv file (or a glob of them), a dataset folder (save_to_disk) or a Hub dataset id"


def _sniff(path: Path) -> str | None:
    """What a file that is not text looks like ('a parquet file', 'binary data'), or None for text."""
    with open(path, "rb") as f:
        head = f.read(8192)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    if b"\x00" in head:
        return "binary data"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:   # a multi-byte character cut at the end of the sample is fine
            return "not UTF-8 text"
    return None


def _builder_of(path: Path) -> str:
    """The `datasets` builder for one local file, or DataError (one line) for binary/unknown files."""
    name = path.name.lower()
    compressed = name.endswith(COMPRESSED)
    ext = Path(name[: name.rfind(".")] if compressed else name).suffix
    builder = BUILDERS.get(ext)
    if compressed:
        if builder is None:
            raise DataError(f"--data {path}: a compressed file of unknown format ({ext or 'no extension'}); give {KNOWN}")
        return builder
    what = _sniff(path)
    if builder == "parquet":
        if what != "a parquet file":
            raise DataError(f"--data {path}: named .parquet but {'it is ' + what if what else 'it holds text'}; "
                            "give a parquet file or rename it")
        return builder
    if what == "not UTF-8 text" and builder == "text":
        return builder   # a .txt in another encoding: read with undecodable bytes replaced, as before
    if what == "not UTF-8 text":
        raise DataError(f"--data {path}: not UTF-8 text and not a known format; give {KNOWN}")
    if what is not None:
        raise DataError(f"--data {path}: {what}, not text; give {KNOWN}")
    return builder or "text"   # UTF-8 text without a known extension (README, notes): plain text


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _is_hub_id(s: str) -> bool:
    return s.count("/") <= 1 and not s.startswith((".", "/", "~")) and "\\" not in s and not Path(s).exists() \
        and not any(c in s for c in "*?[")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def read_documents(source: str, text_column: str = "text", split: str = "train", sample_by: str = "document",
                   revision: str | None = None) -> tuple[Iterator[str], dict]:
    """(documents, origin): an iterator over the non-empty text of each document, and a dict saying
    where they come from (recorded in the corpus manifest). DataError with one line for a binary or
    unknown file, a missing text column, or a dataset that cannot be read."""
    import datasets

    if sample_by not in SAMPLE_BY:
        raise DataError(f"--sample-by must be one of {', '.join(SAMPLE_BY)}, got {sample_by!r}")
    p = Path(source).expanduser()
    origin: dict = {"source": source, "text_column": text_column}
    try:
        if _is_saved_dataset(p):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"--data {source}: no split {split!r} (has {', '.join(ds)}); pass --split")
                ds = ds[split]
            origin |= {"kind": "saved dataset", "split": split, "fingerprint": getattr(ds, "_fingerprint", None)}
        elif p.is_dir():
            if (p / "manifest.json").exists() or (p / "pack.json").exists():
                raise DataError(f"--data {source} is already a token corpus; train on it directly")
            raise DataError(f"--data {source} is a folder without a saved dataset (dataset_info.json); give {KNOWN}")
        elif p.is_file() or any(c in source for c in "*?["):
            files = [Path(f) for f in sorted(_glob.glob(str(p)))] if not p.is_file() else [p]
            files = [f for f in files if f.is_file()]
            if not files:
                raise DataError(f"--data {source}: no file matches")
            builders = {_builder_of(f) for f in files}
            if len(builders) > 1:
                raise DataError(f"--data {source}: the files mix formats ({', '.join(sorted(builders))}); one at a time")
            builder = builders.pop()
            kw = {"sample_by": sample_by} if builder == "text" else {}
            if builder == "csv" and all(f.name.lower().split(".")[1:2] == ["tsv"] for f in files):
                kw["delimiter"] = "\t"
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **kw)
            origin |= {"kind": "files", "format": builder, "files": [f.name for f in files]}
            if builder == "text":
                text_column, origin["text_column"] = "text", None
                origin["sample_by"] = sample_by
        elif _is_hub_id(source):
            ds = datasets.load_dataset(source, split=split, streaming=True, revision=revision)
            origin |= {"kind": "hub dataset", "split": split, "revision": revision}
        else:
            raise DataError(f"--data {source}: no such file or folder; give {KNOWN}")
    except DataError:
        raise
    except (Exception, SystemExit) as e:   # the datasets/hub stack raises many kinds; the user needs one line
        hint = " (offline: a Hub dataset needs the network; HF_HUB_OFFLINE is set)" if os.environ.get(
            "HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and origin.get("kind") is None else ""
        raise DataError(f"--data {source}: cannot read it as a dataset: {_first_line(e)}{hint}") from e
    return _texts(ds, source, text_column), origin


def _texts(ds, source: str, column: str) -> Iterator[str]:
    rows = iter(ds)
    first = True
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:   # malformed json, a csv with ragged rows ...: surfaced while reading
            raise DataError(f"--data {source}: unreadable: {_first_line(e)}") from e
        if first:
            if column not in row:
                raise DataError(f"--data {source}: no column {column!r} (columns: {', '.join(map(str, row))}); "
                                "pass --text-column")
            first = False
        text = row[column]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"--data {source}: column {column!r} holds {type(text).__name__}, not text; "
                            "pass the --text-column that holds the text")
        if text.strip():
            yield text


def tokenize_documents(docs: Iterator[str], tokenizer, batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens; the caller adds EOS)."""
    backend, _, _ = _backend(tokenizer)
    buf: list[str] = []
    for d in docs:
        buf.append(d)
        if len(buf) >= batch:
            yield from _encode(backend, buf)
            buf.clear()
    if buf:
        yield from _encode(backend, buf)


def tokenize_corpus(source: str, out_dir: str | os.PathLike, tokenizer, *, text_column: str = "text",
                    split: str = "train", sample_by: str = "document", revision: str | None = None,
                    name: str | None = None, max_documents: int | None = None,
                    heldout_percent: int = HELDOUT_PERCENT, progress: bool = True) -> dict:
    """Tokenise a user's corpus into a corpus folder (shards + held-out set + manifest.json) that
    `cacheaug train --data out_dir` reads; returns the manifest. `heldout_percent` of the documents
    (by text hash) form `heldout/indist`; with too few documents for that, the last one does (and a
    single document gives its last 5% of characters)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the corpus")
    if (out / "manifest.json").exists() or (out.is_dir() and any(out.glob("train/*/*.bin"))):
        raise DataError(f"--out {out} already holds a corpus; choose a new folder")
    backend, eos, fp = _backend(tokenizer)
    vocab = backend.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    docs, origin = read_documents(source, text_column, split, sample_by, revision)
    if not name:   # the file's stem, a glob's folder, a Hub dataset's name
        p = Path(source)
        name = p.parent.resolve().name if any(c in p.name for c in "*?[") else (
            p.name.split(".")[0] if p.exists() or origin.get("kind") != "hub dataset" else source.rsplit("/", 1)[-1])
    name = name or "corpus"
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out / "train" / name, name, dtype=dtype)
    held: list[dict] = []
    last: str | None = None
    stats = {"documents": 0, "tokens": 0}
    bar = _progress(desc=name, enabled=progress)

    def kept() -> Iterator[str]:
        nonlocal last
        n = 0
        for text in docs:
            if max_documents and n >= max_documents:
                return
            n += 1
            bar.update(1)
            if doc_hash(text) % 100 < heldout_percent:
                held.append({"source": name, "text": text})
                continue
            if last is not None:   # one document behind: the last may become the held-out set
                yield last
            last = text

    try:
        for ids in tokenize_documents(kept(), tokenizer):
            ids.append(eos)
            writer.write(np.asarray(ids, dtype=np.int64))
            stats["tokens"] += len(ids)
            stats["documents"] += 1
        tail = last
        if tail is not None:
            if not held and stats["documents"] > 0:
                held.append({"source": name, "text": tail})   # too few documents for a 1% share
                tail = None
            elif not held:   # a single document: its last 5% of characters, cut at whitespace
                cut = tail.rfind(" ", 0, int(len(tail) * 0.95)) if " " in tail else int(len(tail) * 0.95)
                cut = cut if cut > 0 else int(len(tail) * 0.95)
                held.append({"source": name, "text": tail[cut:]})
                tail = tail[:cut]
        if tail:
            ids = _encode(backend, [tail])[0] + [eos]
            writer.write(np.asarray(ids, dtype=np.int64))
            stats["tokens"] += len(ids)
            stats["documents"] += 1
    finally:
        bar.close()
        shards = writer.close()
    if stats["tokens"] == 0:
        raise DataError(f"--data {source}: no text to train on (no non-empty documents)")
    for sh in shards:
        sh["path"] = f"train/{name}/{sh['path']}"
    heldout = {}
    if held:
        info = _write_heldout(out, "indist", held, backend, dtype)
        info.update(name="indist", description=f"{heldout_percent}% of the documents by text hash")
        heldout["indist"] = info
    manifest = {
        "format": {"dtype": dtype.name, "eos_id": eos, "separator": "eos after every document"},
        "tokenizer": {"fingerprint": fp, "vocab_size": vocab,
                      "name": getattr(tokenizer, "name_or_path", None) or "tokenizers.Tokenizer"},
        "small": False,
        "train_tokens": stats["tokens"],
        "train_documents": stats["documents"],
        "sources": {name: {"description": f"{source} ({origin.get('kind')})", "origin": origin, "licence": "",
                           "packages": [], "documents": stats["documents"], "tokens": stats["tokens"],
                           "documents_dropped_decontam": 0, "heldout_documents": len(held), "shards": shards,
                           "seconds": round(time.time() - t0, 1)}},
        "heldout": heldout,
        "mix": {"weights": {name: 1.0}, "alpha": 1.0, "cap": 1.0, "scale": {}, "file": None},
        "decontamination": {"applied": False, "note": "a user's corpus is not checked against the benchmarks"},
        "failed": {},
    }
    _write_json(out / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# CLI


def _cmd_tokenize(args) -> int:
    from .data import summary_table
    from .decoder import load_tokenizer

    tokenizer = load_tokenizer(args.decoder or None)
    m = tokenize_corpus(args.source, args.out, tokenizer, text_column=args.text_column, split=args.split,
                        sample_by=args.sample_by, revision=args.revision or None, name=args.name or None,
                        max_documents=args.max_documents, progress=sys.stderr.isatty())
    print(summary_table(m))
    print(f"manifest: {Path(args.out) / 'manifest.json'} ({m['format']['dtype']} token ids)")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("tokenize", help="tokenise your own corpus (text, jsonl, parquet, csv, a dataset "
                              "folder or a Hub dataset) into a folder for `train --data`")
    p.add_argument("source", help=KNOWN)
    p.add_argument("--out", required=True, help="the corpus folder to write (new)")
    p.add_argument("--decoder", default="", help="tokenise with this decoder's tokenizer: a folder or a Hub id "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--text-column", default="text", help="the column (field) holding the text (default: text)")
    p.add_argument("--split", default="train", help="split of a dataset folder or Hub dataset (default: train)")
    p.add_argument("--sample-by", choices=SAMPLE_BY, default="document",
                   help="plain text: one document per file, per blank-line paragraph or per line")
    p.add_argument("--revision", default="", help="a Hub dataset's branch, tag or commit")
    p.add_argument("--name", default="", help="the source's name in the manifest (default: from the file or id)")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents (streams)")
    p.set_defaults(fn=_cmd_tokenize)
