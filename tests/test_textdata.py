"""A user's own corpus: each format through `datasets`, refusals, uint32 shards, tokenize and train.

    pytest tests/test_textdata.py
"""

import json
from pathlib import Path

import numpy as np
import pytest

from cacheaug_core import textdata
from cacheaug_core.data import DataError, TokenData, load_heldout, token_dtype
from tests.conftest import byte_tokenizer

DOCS = [f"Document number {i}: the quick brown fox {i} jumps over the lazy dog. " * 3 for i in range(40)]


def _write(tmp_path, fmt: str, column: str = "text"):
    """DOCS in one file of format `fmt`, written by the library a user would write it with."""
    p = tmp_path / f"docs.{fmt}"
    if fmt in ("parquet", "csv", "saved"):
        import datasets

        ds = datasets.Dataset.from_dict({column: DOCS, "id": list(range(len(DOCS)))})
    if fmt == "jsonl":
        p.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    elif fmt == "json":   # a JSON array of records
        p.write_text(json.dumps([{column: d, "id": i} for i, d in enumerate(DOCS)]))
    elif fmt == "parquet":
        ds.to_parquet(str(p))
    elif fmt == "csv":
        ds.to_csv(str(p), index=False)
    elif fmt == "saved":
        p = tmp_path / "saved"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(p))
    return str(p)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "saved"])
def test_each_format_yields_its_documents(tmp_path, fmt):
    docs, origin = textdata.read_documents(_write(tmp_path, fmt, column="body"), text_column="body")
    assert list(docs) == DOCS
    assert origin["text_column"] == "body"


def test_plain_text_one_document_per_file_or_per_paragraph(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"Para one of {i}.\n\nPara two of {i}.\n")
    docs, origin = textdata.read_documents(str(tmp_path / "part*.txt"))
    assert [d.strip() for d in docs] == [f"Para one of {i}.\n\nPara two of {i}." for i in range(3)]
    assert origin["format"] == "text" and origin["files"] == ["part0.txt", "part1.txt", "part2.txt"]
    docs, _ = textdata.read_documents(str(tmp_path / "part1.txt"), sample_by="paragraph")
    assert [d.strip() for d in docs] == ["Para one of 1.", "Para two of 1."]
    m = textdata.tokenize_corpus(str(tmp_path / "part*.txt"), tmp_path / "c", byte_tokenizer(), progress=False)
    assert list(m["sources"]) == [tmp_path.name.replace(".", "_")]      # a glob's source: its folder
    assert m["train_documents"] >= 1 and m["train_documents"] + m["heldout"]["indist"]["documents"] == 3


def test_a_missing_text_column_names_the_columns(tmp_path):
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, id\); pass --text-column"):
        list(textdata.read_documents(_write(tmp_path, "jsonl", column="body"))[0])
    with pytest.raises(DataError, match="column 'id' holds int, not text"):
        list(textdata.read_documents(_write(tmp_path, "parquet", column="body"), text_column="id")[0])


def test_binary_and_unknown_input_is_refused_in_one_line(tmp_path):
    parquet = _write(tmp_path, "parquet")
    disguised = tmp_path / "notes.txt"
    disguised.write_bytes(open(parquet, "rb").read())          # parquet bytes named .txt
    blob = tmp_path / "weights.dat"
    blob.write_bytes(bytes(range(256)) * 8)
    fake_parquet = tmp_path / "table.parquet"
    fake_parquet.write_text("id,text\n1,hello\n")
    latin = tmp_path / "notes.dat"
    latin.write_bytes("caf\xe9 au lait, na\xefve r\xe9sum\xe9 ".encode("latin-1") * 20)
    for path, what in ((disguised, "a parquet file, not text"), (blob, "binary data, not text"),
                       (fake_parquet, "named .parquet but it holds text"),
                       (latin, "not UTF-8 text and not a known format"),
                       (tmp_path, "a folder without a saved dataset")):
        with pytest.raises(DataError, match=what) as e:
            textdata.read_documents(str(path))
        assert "\n" not in str(e.value)


def test_a_latin1_txt_file_still_trains_with_replacement_characters(tiny_decoder_dir, tmp_path):
    from cacheaug_core.decoder import load_tokenizer
    from cacheaug_core.train import TextData, open_train_heldout

    latin = tmp_path / "notes.txt"
    latin.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    tok = load_tokenizer(tiny_decoder_dir)
    tr, _ = open_train_heldout(str(latin), tok)
    assert isinstance(tr, TextData) and tr.num_tokens > 0


def test_bad_json_is_reported_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError) as e:
        list(textdata.read_documents(str(bad))[0])
    assert str(e.value).startswith(f"--data {bad}") and "\n" not in str(e.value)


def test_an_offline_hub_dataset_fails_at_once(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(DataError, match="cannot read it as a dataset"):
        textdata.read_documents("someone/some-dataset")
    assert time.time() - t0 < 10


def test_tokenize_writes_a_corpus_that_training_reads(tmp_path):
    tok = byte_tokenizer()
    m = textdata.tokenize_corpus(_write(tmp_path, "jsonl"), tmp_path / "corpus", tok, progress=False)
    assert m["format"]["dtype"] == "uint16"
    held = m["sources"]["docs"]["heldout_documents"]
    assert m["train_documents"] + held == len(DOCS) and held >= 1
    # the shards hold exactly the documents' ids, each followed by EOS
    ids = np.concatenate([np.fromfile(tmp_path / "corpus" / sh["path"], dtype=np.uint16)
                          for sh in m["sources"]["docs"]["shards"]])
    assert len(ids) == m["train_tokens"] and (ids == tok.eos_token_id).sum() == m["train_documents"]
    heldout_text = [d["text"] for d in map(json.loads, open(tmp_path / "corpus" / "heldout" / "indist.jsonl"))]
    train_text = [d for d in DOCS if d not in heldout_text]
    want = np.concatenate([tok.encode(d, add_special_tokens=False) + [tok.eos_token_id] for d in train_text])
    assert np.array_equal(ids, want)
    data = TokenData(tmp_path / "corpus")
    import torch

    x = data.sample(3, 16, torch.Generator().manual_seed(0))
    assert x.shape == (3, 16) and int(x.max()) < len(tok)
    with pytest.raises(DataError, match="already holds a corpus"):
        textdata.tokenize_corpus(_write(tmp_path, "jsonl"), tmp_path / "corpus", tok, progress=False)


def _big_vocab_tokenizer(n: int = 70_000):
    """A word-level tokenizer of n > 65,536 tokens (built offline with `tokenizers`), whose ids for
    the test's words lie past 65,535, where uint16 would wrap them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog."]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {f"filler{i}": i + 2 for i in range(n - 2 - len(words))}
    for w in words:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="[UNK]")


def test_a_vocabulary_over_65536_gets_uint32_shards(tmp_path):
    tok = _big_vocab_tokenizer()
    assert len(tok) > 65_536 and token_dtype(len(tok)) == np.uint32
    text = tmp_path / "fox.jsonl"
    text.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog. " * (i + 1)}) + "\n"
                            for i in range(30)))
    m = textdata.tokenize_corpus(str(text), tmp_path / "c", tok, progress=False)
    assert m["format"]["dtype"] == "uint32"
    ids = np.fromfile(tmp_path / "c" / m["sources"]["fox"]["shards"][0]["path"], dtype=np.uint32)
    fox = tok.convert_tokens_to_ids("fox")
    assert fox > 65_535 and fox in ids                     # uint16 would have wrapped it to fox - 65536
    import torch

    x = TokenData(tmp_path / "c").sample(4, 8, torch.Generator().manual_seed(0))
    assert int(x.max()) > 65_535 and set(x.flatten().tolist()) <= set(ids.tolist())
    held = load_heldout(tmp_path / "c", "indist")
    assert all(int(d.max()) > 65_535 for d in held)
    # a training pack for a GPU machine (scripts/gpu_pack.py) keeps the ids whole too
    import runpy

    from cacheaug_core.train import PackData

    pack = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "gpu_pack.py"))
    pack["main"](["--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "pack"), "--tokens", "64", "--window", "8",
                  "--heldout", "indist"])
    assert json.loads((tmp_path / "pack" / "pack.json").read_text())["dtype"] == "uint32"
    assert int(PackData(tmp_path / "pack", "train").tokens.max()) > 65_535


def test_train_reads_jsonl_and_parquet_and_refuses_binary(tiny_decoder_dir, tmp_path):
    from cacheaug_core.config import CoprocessorConfig, TrainConfig
    from cacheaug_core.decoder import load_tokenizer
    from cacheaug_core.train import TrainingError, open_train_heldout, train

    tok = load_tokenizer(tiny_decoder_dir)
    for fmt in ("jsonl", "parquet"):
        tr, he = open_train_heldout(_write(tmp_path, fmt, column="body"), tok, "body")
        want = [i for d in DOCS for i in tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]]
        assert tr.tokens.tolist() + he.tokens.tolist() == want
    blob = tmp_path / "x.bin"
    blob.write_bytes(b"\x00\x01" * 4096)
    cfg = TrainConfig(decoder=tiny_decoder_dir, data=str(blob), out_dir=str(tmp_path / "run"), seq_len=32, points=4,
                      n_ahead=2, batch_size=2, steps=2, warmup=1, eval_every=0, device="cpu")
    with pytest.raises(DataError, match="binary data, not text"):
        train(cfg, CoprocessorConfig(num_latents=2, num_layers=1), show_progress=False)
    with pytest.raises(TrainingError, match="cacheaug tokenize someone/data"):
        open_train_heldout("someone/data", tok)


def test_cli_tokenize_then_train(tiny_decoder_dir, tmp_path, capsys):
    from cacheaug_core.cli import main

    src = _write(tmp_path, "parquet", column="body")
    assert main(["tokenize", src, "--out", str(tmp_path / "c"), "--decoder", tiny_decoder_dir,
                 "--text-column", "body"]) == 0
    assert "uint16 token ids" in capsys.readouterr().out
    assert main(["train", "--decoder", tiny_decoder_dir, "--data", str(tmp_path / "c"), "--out-dir",
                 str(tmp_path / "run"), "--seq-len", "32", "--points", "4", "--n-ahead", "2", "--batch-size", "2",
                 "--steps", "2", "--warmup", "1", "--eval-every", "1", "--eval-batches", "1", "--device", "cpu",
                 "--num-latents", "2", "--num-layers", "1"]) == 0
    assert (tmp_path / "run" / "last" / "model.safetensors").exists()
    # a corpus for another tokenizer is refused by its fingerprint
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    textdata.tokenize_corpus(str(other), tmp_path / "c2", _big_vocab_tokenizer(), progress=False)
    assert main(["train", "--decoder", tiny_decoder_dir, "--data", str(tmp_path / "c2"), "--out-dir",
                 str(tmp_path / "run2"), "--seq-len", "32", "--points", "4", "--device", "cpu"]) == 2
    assert "tokenizer of 70000 tokens" in capsys.readouterr().err


def test_a_missing_optional_package_names_its_extra(tiny_decoder_dir, tmp_path, monkeypatch, capsys):
    import sys

    from cacheaug_core.cli import main

    monkeypatch.setitem(sys.modules, "datasets", None)     # as if the `data` extra were not installed
    assert main(["tokenize", _write(tmp_path, "jsonl"), "--out", str(tmp_path / "c"), "--decoder",
                 tiny_decoder_dir]) == 2
    err = capsys.readouterr().err
    assert "needs datasets, which is not installed: pip install 'cacheaug[data]'" in err and err.count("\n") == 1
