"""Coprocessor checkpoints on the Hugging Face Hub, offline: a local stand-in for the Hub.

`LocalHub` takes `push_to_hub`'s calls (the `HfApi` methods it uses, with HfApi's own signatures,
checked below) and stores each commit the way the Hub's client caches a download: the
`models--user--repo/{refs,snapshots}` layout of the Hugging Face cache. Loading then goes through
the real `huggingface_hub.snapshot_download` with HF_HUB_OFFLINE=1, which resolves the branch to
its commit and the commit to its files there; nothing reaches the network.

    pytest tests/test_hub.py
"""

import hashlib
import inspect
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from cacheaug_core.checkpoint import (CheckpointError, eval_results, from_pretrained, load_coprocessor,
                                      model_card, push_to_hub, save_coprocessor)
from cacheaug_core.config import CoprocessorConfig
from cacheaug_core.coprocessor import Coprocessor
from cacheaug_core.decoder import load_decoder


class LocalHub:
    """The HfApi methods push_to_hub calls, storing commits in a Hugging Face cache folder."""

    def __init__(self, cache: Path):
        self.cache, self.calls, self.uploaded = cache, [], []

    def _repo(self, repo_id):
        return self.cache / f"models--{repo_id.replace('/', '--')}"

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, private))
        (self._repo(repo_id) / "refs").mkdir(parents=True, exist_ok=True)

    def create_branch(self, repo_id, *, branch, revision=None, token=None, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, commit_description=None,
                      token=None, repo_type=None, revision=None, **kw):
        files = sorted(p for p in Path(folder_path).rglob("*") if p.is_file())
        commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
        snap = self._repo(repo_id) / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copy2(p, snap / p.name)
        (self._repo(repo_id) / "refs" / (revision or "main")).write_text(commit)
        self.uploaded.append([p.name for p in files])
        return f"local://{repo_id}/commit/{commit}"


def test_local_hub_takes_hfapi_signatures():
    """The stand-in is called the way push_to_hub calls the real HfApi: every keyword it passes
    exists in HfApi's own methods."""
    from huggingface_hub import HfApi

    src = inspect.getsource(push_to_hub)
    for method in ("create_repo", "create_branch", "upload_folder"):
        params = inspect.signature(getattr(HfApi, method)).parameters
        call = src[src.index(f"api.{method}("):]
        call = call[: call.index(")\n")]
        for kw in [a.split("=")[0].strip() for a in call[len(f"api.{method}("):].split(",") if "=" in a]:
            assert kw in params, (method, kw)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return LocalHub(cache)


def _trained(tiny_decoder_dir, out: Path, seed: int):
    dec, tok, info = load_decoder(tiny_decoder_dir)
    torch.manual_seed(seed)
    cop = Coprocessor(CoprocessorConfig(num_latents=2, num_layers=1), dec)
    with torch.no_grad():
        for p in cop.trainable_state().values():
            p.add_(torch.randn_like(p) * 0.1)
    ev = {"heldout_by_position": {"rel_ppl_change_pct": [-3.5, -1.25], "mean_rel_1_16": -2.375}}

    def state(tmp):   # what the trainer adds to out_dir/last: never uploaded
        (tmp / "trainer_state.json").write_text("{}")
        (tmp / "trainer_state.safetensors").write_bytes(b"x")

    save_coprocessor(cop, out, info, training={"steps": 3}, evaluation=ev, extra_files=state)
    return cop, dec, info


def test_push_then_load_by_hub_id_and_revision(tiny_decoder_dir, tmp_path, hub):
    a, dec, info = _trained(tiny_decoder_dir, tmp_path / "a", seed=1)
    b, _, _ = _trained(tiny_decoder_dir, tmp_path / "b", seed=2)
    push_to_hub(tmp_path / "a", "someone/tiny-cop", api=hub)
    push_to_hub(tmp_path / "b", "someone/tiny-cop", api=hub, revision="v2")
    assert all("trainer_state.json" not in up and "trainer_state.safetensors" not in up for up in hub.uploaded)
    assert hub.uploaded[0] == ["README.md", "config.json", "model.safetensors"]
    for rev, want in ((None, a), ("v2", b)):
        got = load_coprocessor("someone/tiny-cop", dec, info, revision=rev)
        for k, v in want.trainable_state().items():
            assert torch.equal(got.trainable_state()[k], v), (rev, k)
    got = load_coprocessor("someone/tiny-cop@v2", dec, info)
    assert torch.equal(got.trainable_state()["soft_tokens"], b.trainable_state()["soft_tokens"])
    # from_pretrained loads the decoder the checkpoint records (here a local folder) with it
    cop, dec2, tok, info2 = from_pretrained("someone/tiny-cop", revision="v2")
    assert info2.tokenizer_fingerprint == info.tokenizer_fingerprint
    assert torch.equal(cop.trainable_state()["soft_tokens"], b.trainable_state()["soft_tokens"])
    # the repo's card is a Hub model card with the metadata the Hub reads
    from huggingface_hub import ModelCard

    snap = next((hub.cache / "models--someone--tiny-cop" / "snapshots").iterdir())
    card = ModelCard.load(snap / "README.md")
    assert card.data.library_name == "cacheaug" and card.data.license == "apache-2.0"
    assert "--coprocessor someone/tiny-cop" in card.text


def test_workbench_and_cli_take_a_hub_id(tiny_decoder_dir, tmp_path, hub, capsys):
    from cacheaug_core.cli import main
    from cacheaug_core.workbench import Workbench

    a, _, _ = _trained(tiny_decoder_dir, tmp_path / "a", seed=1)
    assert main(["push", str(tmp_path / "a"), "someone/x"]) == 2          # the real HfApi: no network, one line
    assert "push to someone/x failed" in capsys.readouterr().err
    push_to_hub(tmp_path / "a", "someone/x", api=hub)
    wb = Workbench.load(tiny_decoder_dir, "someone/x")
    assert wb.coprocessor_source == "someone/x"
    assert torch.equal(wb.coprocessor.trainable_state()["soft_tokens"], a.trainable_state()["soft_tokens"])
    assert main(["info", "--decoder", tiny_decoder_dir, "--coprocessor", "someone/x", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["coprocessor_source"] == "someone/x"


def test_an_unknown_hub_id_fails_at_once_in_one_line(tiny_decoder_dir, hub, capsys):
    from cacheaug_core.cli import main

    t0 = time.time()
    assert main(["info", "--decoder", tiny_decoder_dir, "--coprocessor", "nobody/nothing"]) == 2
    err = capsys.readouterr().err
    assert time.time() - t0 < 10
    assert "no checkpoint folder at nobody/nothing" in err and "HF_HUB_OFFLINE" in err and err.count("\n") == 1


def test_card_metadata_base_model_and_model_index():
    """Cards name the decoder's Hub id as base_model and carry the evaluation tables as model-index
    results; a baseline's table (another model) is left out."""
    from huggingface_hub import ModelCard

    shipped = json.loads((Path(__file__).resolve().parent.parent / "assets" / "coprocessor" / "config.json").read_text())
    # an evaluation table as `eval ppl` prints it (the values are this test's, not a result)
    rows = [(1, -11.85), (2, -2.93), (4, -3.56), (8, -3.62), (16, -3.17), (32, -3.4)]
    table = ("| position | tokens | ppl decoder | ppl + coprocessor | rel. change | 95% CI |\n|---:|---:|---:|---:|---:|---|\n"
             + "".join(f"| {p} | 1,000 | 20.000 | 19.000 | {v:+.2f}% | [-1.00%, 1.00%] |\n" for p, v in rows))
    shipped["evaluation"] = {"Wikipedia summaries (held out, out of distribution)": table, **shipped.get("evaluation", {})}
    card = ModelCard(model_card(shipped, repo_id="someone/shipped"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    results = card.data.eval_results
    wiki = [r for r in results if r.dataset_name.startswith("Wikipedia summaries")]
    assert [r.metric_value for r in wiki] == [-11.85, -2.93, -3.56, -3.62, -3.17, -3.4]   # the table's own rows
    assert not any("baseline" in r.dataset_name.lower() for r in results)
    assert {r.dataset_type for r in results} >= {"ARC-e"}
    local = dict(shipped, decoder=dict(shipped["decoder"], name="/some/folder"))
    assert ModelCard(model_card(local)).data.base_model is None
    hubdec = dict(shipped, decoder=dict(shipped["decoder"], name="Qwen/Qwen2.5-0.5B"), evaluation={})
    assert ModelCard(model_card(hubdec)).data.base_model == "Qwen/Qwen2.5-0.5B"
    assert eval_results({"evaluation": {"held-out": {"rel_ppl_change_pct": [-1.0, 2.0]}}})[1].metric_value == 2.0


def test_push_refuses_corrupted_weights_and_bad_ids(tiny_decoder_dir, tmp_path, hub):
    _trained(tiny_decoder_dir, tmp_path / "a", seed=1)
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        push_to_hub(tmp_path / "a", "no-slash", api=hub)
    f = tmp_path / "a" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        push_to_hub(tmp_path / "a", "someone/x", api=hub)
    assert hub.uploaded == []


def test_cli_push_lists_what_it_uploads(tiny_decoder_dir, tmp_path, hub, monkeypatch, capsys):
    import huggingface_hub

    from cacheaug_core.cli import main

    _trained(tiny_decoder_dir, tmp_path / "a", seed=1)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    assert main(["push", str(tmp_path / "a"), "someone/cli", "--revision", "dev", "--private"]) == 0
    out = capsys.readouterr().out
    assert "pushed config.json, model.safetensors and a model card to someone/cli" in out
    assert ("create_repo", "someone/cli", True) in hub.calls and ("create_branch", "someone/cli", "dev") in hub.calls
    assert (hub.cache / "models--someone--cli" / "refs" / "dev").exists()


def test_from_pretrained_reads_the_decoder_at_the_commit_it_records(tmp_path, hub):
    """A coprocessor trained on a Hub decoder records the commit it read; when that repo moves on
    (new weights on main), from_pretrained still loads the recorded commit, while an explicit
    decoder name means the latest. A revision for a local folder is refused, not dropped."""
    from conftest import save_tiny_decoder
    from cacheaug_core.decoder import DecoderLoadError

    hub.create_repo("someone/dec")
    first = hub.upload_folder(repo_id="someone/dec", folder_path=save_tiny_decoder(tmp_path / "d0", seed=0))
    commit = first.rsplit("/", 1)[1]
    dec0, tok, info0 = load_decoder("someone/dec")
    assert info0.revision == commit                         # what transformers reports for the snapshot read
    cop = Coprocessor(CoprocessorConfig(num_latents=2, num_layers=1), dec0)
    save_coprocessor(cop, tmp_path / "cop", info0, training={"steps": 1})
    hub.upload_folder(repo_id="someone/dec", folder_path=save_tiny_decoder(tmp_path / "d1", seed=1))   # main moves on
    w0 = dec0.get_input_embeddings().weight
    latest, _, info1 = load_decoder("someone/dec")
    assert info1.revision != commit and not torch.equal(latest.get_input_embeddings().weight, w0)
    _, dec, _, info = from_pretrained(tmp_path / "cop")
    assert info.revision == commit and torch.equal(dec.get_input_embeddings().weight, w0)
    _, dec, _, info = from_pretrained(tmp_path / "cop", decoder="someone/dec")    # named: the latest
    assert info.revision == info1.revision
    with pytest.raises(DecoderLoadError, match="applies to a Hub id only"):
        load_decoder(str(tmp_path / "d0"), revision=commit)
