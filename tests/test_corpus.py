"""cacheaug_core.corpus: mode (b) over documents, its pooled tables and the `cacheaug corpus` command.

Tiny random decoder (tests/conftest.py); the decoder arm is checked against the decoder's own
transformers forward, the pooled tables against sums computed here from the per-document matrices.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cacheaug_core import corpus
from cacheaug_core.workbench import Workbench

DOCS = ["The cat sat on the mat. It was 42 years old.", "Dogs bark at night, and 7 owls hoot!",
        "A third text: numbers 1, 2, 3 and words."]


@pytest.fixture(scope="module")
def wb(tiny_decoder_dir):
    return Workbench.load(decoder=tiny_decoder_dir)


@pytest.fixture(scope="module")
def run(wb):
    cfg = corpus.CorpusConfig(positions=3, max_docs=3, max_tokens=24, sink="auto", n_boot=200)
    steps = [(len(r.docs), r.finished, r) for r in corpus.score_corpus(wb, [{"text": t} for t in DOCS], cfg)]
    return steps  # the same growing result each time: lengths recorded as yielded


def test_progressive_results_and_sink(run, wb):
    assert [(n, f) for n, f, _ in run] == [(1, False), (2, False), (3, False), (3, True)]
    res = run[-1][2]
    sink = corpus.sink_token_id(wb.tokenizer, "auto")
    assert sink in (wb.tokenizer.bos_token_id, wb.tokenizer.eos_token_id)
    for d in res.docs:
        ids = wb.tokenizer.encode(DOCS[d.index], add_special_tokens=False)[:24]
        assert len(d.tokens) == len(ids) and d.offset == 1
        # The decoder arm is the decoder's own forward on [sink] + document: NLL of token j+1 given 0..j.
        x = torch.tensor([[sink] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(wb.decoder(x).logits.float(), -1)[0]
        nll = -logp[:-1].gather(-1, x[0, 1:, None])[:, 0].double().numpy()            # target = input j+1
        P, A = d.nll_base.shape
        for p in range(P):
            for n in range(1, A + 1):
                if p + n < x.shape[1]:
                    assert d.nll_base[p, n - 1] == pytest.approx(nll[p + n - 1], abs=1e-4)
                else:
                    assert np.isnan(d.nll_base[p, n - 1])
        # Target index in the document: row p, column n-1 -> p + n - 1 (the sink is input token 0).
        assert d.target_index()[0, 0] == 0


def test_by_position_pools_documents_and_splits(run):
    res = run[-1][2]
    bp = corpus.by_position(res)
    for split in ("all", "body", "doc_start"):
        for n in (1, 3):
            sa = sb = cnt = 0.0
            for d in res.docs:
                t = d.target_index()[:, n - 1]
                keep = np.isfinite(d.nll_base[:, n - 1]) & {"all": t >= 0, "body": t >= 4, "doc_start": t < 4}[split]
                sa += d.nll_aug["coprocessor"][keep, n - 1].sum()
                sb += d.nll_base[keep, n - 1].sum()
                cnt += keep.sum()
            row = bp[(bp.split == split) & (bp.position == n)].iloc[0]
            assert row.tokens == cnt
            assert row.rel_ppl_change_pct == pytest.approx(np.expm1((sa - sb) / cnt) * 100, rel=1e-9)
            assert row.ci_low <= row.ci_high
    # A document's first token is a target only through the sink, and only doc_start holds it.
    assert bp[(bp.split == "doc_start") & (bp.position == 1)].iloc[0].tokens == 4 * len(res.docs)


def test_token_tables_and_buckets(run):
    res = run[-1][2]
    tf = corpus.tokens_frame(res, "coprocessor", 2)
    d0 = res.docs[0]
    b, a = d0.per_token("coprocessor", 2)
    assert list(tf[tf.doc == 0]["index"]) == list(np.flatnonzero(np.isfinite(b)))
    assert np.allclose(tf[tf.doc == 0]["delta"], (a - b)[np.isfinite(b)])
    docs = corpus.documents_frame(res, "coprocessor", 2)
    assert docs.loc[0, "delta"] == pytest.approx(tf[tf.doc == 0]["delta"].mean())
    surpr = corpus.by_surprisal(res, "coprocessor", 2)
    assert surpr["tokens"].sum() == len(tf)                   # the buckets partition the tokens
    kinds = corpus.by_kind(res, "coprocessor", 2)
    assert kinds.set_index("kind").loc["digit", "tokens"] == tf["kind"].str.contains("digit").sum() > 0


@pytest.mark.parametrize("tok,i,want", [(" cat", 5, ["word_start"]), ("at", 5, ["word_piece"]),
                                        ("42", 6, ["digit"]), (",", 7, ["punctuation"]), ("The", 0, ["doc_start", "word_start"]),
                                        ("\n", 9, ["whitespace"])])
def test_token_kinds(tok, i, want):
    assert corpus.token_kinds(tok, i) == want


def test_read_corpus_formats_and_errors(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "one", "title": "T"}\n\n{"text": "two"}\n', encoding="utf-8")
    # as `eval ppl` reads it: the title joined to its text, one document
    assert corpus.read_corpus(j) == [{"title": "T", "text": "T\n\none"}, {"title": "two", "text": "two"}]
    t = tmp_path / "a.txt"
    t.write_text("Title\n\nits body\nline\n\f\nsecond\n", encoding="utf-8")   # blank lines stay inside
    assert [d["text"] for d in corpus.read_corpus(t)] == ["Title\n\nits body\nline", "second"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"no": 1}\n', encoding="utf-8")
    with pytest.raises(corpus.CorpusError, match="b.jsonl:1"):
        corpus.read_corpus(bad)
    with pytest.raises(corpus.CorpusError, match="no such file"):
        corpus.read_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(corpus.CorpusError, match="ahead"):
        corpus.CorpusConfig(positions=2, ahead=3).check()
    wiki = corpus.read_corpus("wiki")                       # the bundled held-out sample
    assert len(wiki) >= 100 and all(d["text"] and d["title"] for d in wiki)


def test_cli_corpus_writes_json_csv_html(tiny_decoder_dir, tmp_path, capsys):
    from cacheaug_core import cli

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS), encoding="utf-8")
    out = tmp_path / "run.json"
    rc = cli.main(["corpus", "--decoder", tiny_decoder_dir, "--text", str(src), "--json", str(out), "--csv",
                   str(tmp_path / "t.csv"), "--html", str(tmp_path / "c.html"), "--positions", "2",
                   "--max-tokens", "16", "--n-boot", "50"])
    assert rc == 0
    run = json.loads(out.read_text())
    assert run["finished"] and len(run["documents_scored"]) == 3
    assert {r["split"] for r in run["by_position"]} == {"all", "body", "doc_start"}
    assert (tmp_path / "t.csv").read_text().startswith("doc,title,index,token")
    assert "plotly" in (tmp_path / "c.html").read_text()[:5000].lower()
    assert cli.main(["corpus", "--decoder", tiny_decoder_dir, "--text", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_reference_curves_from_markdown_and_json_and_the_status_line():
    md = ("| position | tokens | ppl decoder | ppl + coprocessor | rel. change | 95% CI |\n|---:|---:|---:|---:|---:|---|\n"
          "| 1 | 1,000 | 20.0 | 18.0 | -10.00% | [-12.00%, -8.00%] |\n| 16 | 900 | 17.0 | 16.5 | -2.94% | [-3.50%, -2.40%] |\n")
    js = {"positions": [1, 2], "rel_ppl_change_pct": [-5.0, 1.0], "rel_ppl_change_ci95": [[-6, -4], [-1, 3]],
          "tokens_scored": [10, 9]}
    curves = corpus.reference_curves({"wiki": md, "json": js, "note": "free text", "other": {"a": 1}})
    assert list(curves) == ["wiki", "json"]
    assert curves["wiki"].to_dict("list") == {"position": [1, 16], "rel_ppl_change_pct": [-10.0, -2.94],
                                              "ci_low": [-12.0, -3.5], "ci_high": [-8.0, -2.4],
                                              "tokens": [1000.0, 900.0]}
    assert curves["json"].ci_high.tolist() == [-4.0, 3.0]
    line = corpus.status_line({"wiki": md})
    assert line.startswith("wiki:") and "-10.0% at the next token [-12.0, -8.0]" in line and "16 tokens ahead" in line
    assert corpus.status_line({}) == "" and corpus.status_line(None) == ""
    assert corpus.reference_at(curves["wiki"], 8).position == 1 and corpus.reference_at(curves["wiki"], 20).position == 16


def test_verdict_says_when_a_text_is_within_noise():
    from cacheaug_core.viz.app_views import verdict_text

    rng = np.random.default_rng(0)
    noisy = verdict_text(rng.normal(0.0, 1.0, 30))
    assert "within noise" in noisy
    clear = verdict_text(rng.normal(-0.5, 0.1, 200), reference={"position": 1, "rel_ppl_change_pct": -11.85,
                                                                   "ci_low": -12.65, "ci_high": -11.06}, ref_name="wiki")
    assert "lower beyond token-level noise" in clear and "Typical on wiki at position 1: -11.8%" in clear


def test_reference_curves_take_the_body_of_a_document_protocol_table():
    """A stored `eval ppl` table of the document protocol: the status line and the single-text
    reference use its body columns (the headline), not the all-targets ones."""
    table = ("| position | tokens | ppl decoder | ppl + coprocessor | rel. change | 95% CI | body | body 95% CI | doc start |\n"
             "|---:|---:|---:|---:|---:|---|---:|---|---:|\n"
             "| 1 | 1,000 | 15.0 | 14.0 | -4.66% | [-5.45%, -3.82%] | -3.96% | [-4.63%, -3.27%] | -20.26% |\n"
             "| 16 | 900 | 13.4 | 13.1 | -2.54% | [-3.45%, -1.66%] | -2.50% | [-3.40%, -1.60%] | n/a |\n\n"
             "| position | pause | pause body | difference | 95% CI | body difference | body 95% CI |\n"
             "|---:|---:|---:|---:|---|---:|---|\n"
             "| 1 | -4.11% | -2.35% | -0.54% | [-1.14%, +0.05%] | -1.61% | [-2.08%, -1.15%] |\n")
    df = corpus.reference_curves({"wiki": table})["wiki"]
    assert df.position.tolist() == [1, 16] and df.rel_ppl_change_pct.tolist() == [-3.96, -2.50]
    assert df.ci_low.tolist() == [-4.63, -3.40] and df.attrs["body"]
    line = corpus.status_line({"wiki": table})
    assert "-4.0% at the next token [-4.6, -3.3]" in line and "body" in line
    # a table without body columns: the all-targets numbers
    assert corpus.reference_curves({"w": table.replace("body 95% CI", "b ci")})["w"].rel_ppl_change_pct.tolist() == [-4.66, -2.54]


def test_the_first_document_streams_pass_by_pass(wb):
    """The first views come after one pass of the first document's points (a partial document with
    NaN rows for the points not scored yet), not after the whole document; the finished run is the
    same as scoring each document whole."""
    long_doc = " ".join(f"word{i} and {i % 7}." for i in range(30))          # well over one pass of points
    docs = [{"text": long_doc}, {"text": DOCS[1]}]
    cfg = corpus.CorpusConfig(positions=3, max_docs=2, max_tokens=100, sink="auto", n_boot=50, points_per_pass=16)
    seen = []
    for r in corpus.score_corpus(wb, docs, cfg):
        seen.append((r.in_progress, len(r.docs), r.finished,
                     None if not r.in_progress else r.docs[-1].nll_aug["coprocessor"].copy()))
        if r.in_progress:
            corpus.summarize(r)                       # the app tabulates a partial run: it must not fail
    partial = [s for s in seen if s[0]]
    assert len(partial) == 100 // 16                   # 100 points (sink + 100 tokens), 16 a pass: 6 partial
    assert all(n == 1 and not f for _, n, f, _ in partial)
    assert partial[0][0] == "document 1: 16 of 100 augmentation points"
    assert [(n, f) for p, n, f, _ in seen if not p] == [(1, False), (2, False), (2, True)]
    final = r.docs[0].nll_aug["coprocessor"]
    for _, _, _, aug in partial:                       # scored rows = final rows; the rest not yet scored
        done = int(np.isfinite(aug).any(axis=1).sum())
        np.testing.assert_allclose(aug[:done], final[:done], rtol=1e-5, equal_nan=True)
        assert np.isnan(aug[done:]).all()
    whole = corpus.CorpusConfig(positions=3, max_docs=1, max_tokens=100, sink="auto", n_boot=50, points_per_pass=200)
    *_, ref = corpus.score_corpus(wb, docs[:1], whole)
    np.testing.assert_allclose(final, ref.docs[0].nll_aug["coprocessor"], rtol=1e-4, atol=1e-5, equal_nan=True)
