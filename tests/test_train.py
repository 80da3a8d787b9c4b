"""Training, checkpoints and resume on a tiny decoder (CPU, seconds).

    pytest tests/test_train.py
"""

import json

import pytest
import torch

from cacheaug_core import augment, masks
from cacheaug_core.checkpoint import CheckpointError, load_coprocessor, save_coprocessor
from cacheaug_core.config import CoprocessorConfig, TrainConfig
from cacheaug_core.coprocessor import Coprocessor
from cacheaug_core.decoder import load_decoder
from cacheaug_core.train import RECENT_STEPS, TextData, TrainingError, check_data_tokenizer, evaluate_heldout, train
from tests.conftest import save_tiny_decoder


def _cfg(tmp_path, data, **kw):
    base = dict(decoder=data[0], data=data[1], out_dir=str(tmp_path / "run"), seq_len=48, points=6, n_ahead=4,
                batch_size=4, steps=6, warmup=2, lr=3e-3, eval_every=0, save_every=3, log_every=1, device="cpu")
    return TrainConfig(**(base | kw))


def test_checkpoint_round_trip(tiny_decoder_dir, tmp_path):
    dec, tok, info = load_decoder(tiny_decoder_dir)
    cop = Coprocessor(CoprocessorConfig(num_latents=3, body="lora", lora_rank=4), dec)
    with torch.no_grad():
        for p in cop.trainable_state().values():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_coprocessor(cop, tmp_path / "ck", info, training={"steps": 7})
    cop2 = load_coprocessor(path, dec, info)
    for k, v in cop.trainable_state().items():
        assert torch.equal(v, cop2.trainable_state()[k])
    ids = torch.randint(1, 200, (1, 20))
    pts = torch.tensor([[5, 12]])
    a = augment.multi_point_loss(dec, cop, ids, pts, 3)[1]
    b = augment.multi_point_loss(dec, cop2, ids, pts, 3)[1]
    torch.testing.assert_close(a, b, equal_nan=True)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["decoder"]["tokenizer_fingerprint"] == info.tokenizer_fingerprint
    assert "Coprocessor for" in (path / "README.md").read_text()


def test_checkpoint_shards_at_most_16_mib(tiny_decoder_dir, tmp_path):
    import cacheaug_core.checkpoint as ck

    dec, _, info = load_decoder(tiny_decoder_dir)
    cop = Coprocessor(CoprocessorConfig(num_latents=2), dec)
    old = ck.SHARD_BYTES
    ck.SHARD_BYTES = 20_000  # force several shards on a tiny model
    try:
        path = save_coprocessor(cop, tmp_path / "ck", info)
    finally:
        ck.SHARD_BYTES = old
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    load_coprocessor(path, dec, info)


def test_checkpoint_for_another_decoder_is_refused(tiny_decoder_dir, tmp_path):
    dec, _, info = load_decoder(tiny_decoder_dir)
    path = save_coprocessor(Coprocessor(CoprocessorConfig(num_latents=2), dec), tmp_path / "ck", info)
    other_dir = save_tiny_decoder(tmp_path / "other", "qwen2", layers=3)
    dec2, _, info2 = load_decoder(other_dir)
    with pytest.raises(CheckpointError, match="trained for decoder"):
        load_coprocessor(path, dec2, info2)


def test_short_training_beats_frozen_decoder_on_repeated_text(tiny_decoder_dir, repeated_text_file, tmp_path):
    cfg = _cfg(tmp_path, (tiny_decoder_dir, repeated_text_file), steps=40, save_every=40, lr=3e-3)
    path = train(cfg, CoprocessorConfig(num_latents=4, num_layers=1), show_progress=False)
    dec, tok, info = load_decoder(tiny_decoder_dir)
    cop = load_coprocessor(path, dec, info)
    data = TextData(repeated_text_file, tok, "heldout")
    g = torch.Generator().manual_seed(5)
    batches = [data.sample(4, 48, g)]
    pts = [masks.sample_points(48, 6, 4, g)]
    ev = evaluate_heldout(dec, cop, batches, pts, 4)
    # a random tiny decoder is near-uniform; the coprocessor can learn the repeated text's future
    assert sum(ev["nll_aug"]) < sum(ev["nll_base"])
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert lines[-1]["loss"] < lines[0]["loss"]
    made_by = json.loads((path / "config.json").read_text())["training"]["provenance"]
    assert made_by["device"].startswith("cpu") and made_by["num_processes"] == 1 and "commit" in made_by["git"]
    assert "Trained by `" in (path / "README.md").read_text()      # and its model card says so
    # the logged rate is this run's tokens over its wall time so far
    train_lines = [r for r in lines if "tokens_per_s" in r]
    assert train_lines and all(r["tokens_per_s"] > 0 for r in train_lines)
    last = train_lines[-1]
    assert last["tokens_per_s"] == pytest.approx(last["tokens_seen"] / last["elapsed_s"], rel=0.2)
    # and over the latest steps: the first step's equals the whole run's so far; a later one is
    # the tokens of the last RECENT_STEPS steps over their time (elapsed_s is rounded to 10 ms)
    assert all(r["tokens_per_s_recent"] > 0 for r in train_lines)
    assert train_lines[0]["tokens_per_s_recent"] == pytest.approx(train_lines[0]["tokens_per_s"], rel=1e-3)
    by_step = {r["step"]: r for r in train_lines}
    first, later = by_step[10], by_step[10 + RECENT_STEPS]
    window = later["elapsed_s"] - first["elapsed_s"]
    assert later["tokens_per_s_recent"] == pytest.approx(
        (later["tokens_seen"] - first["tokens_seen"]) / window, rel=0.1)


def test_resume_equals_uninterrupted(tiny_decoder_dir, repeated_text_file, tmp_path):
    ccfg = CoprocessorConfig(num_latents=2, num_layers=1)
    data = (tiny_decoder_dir, repeated_text_file)
    full = train(_cfg(tmp_path / "a", data), ccfg, show_progress=False)
    train(_cfg(tmp_path / "b", data, stop_after=3), ccfg, show_progress=False)      # interrupted at step 3
    resumed = train(_cfg(tmp_path / "b", data, resume=True), ccfg, show_progress=False)
    dec, _, info = load_decoder(tiny_decoder_dir)
    a, b = load_coprocessor(full, dec, info), load_coprocessor(resumed, dec, info)
    for k, v in a.trainable_state().items():
        assert torch.equal(v, b.trainable_state()[k]), k
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["step"] == 6


def test_two_runs_in_one_process_may_change_precision(tiny_decoder_dir, repeated_text_file, tmp_path):
    """accelerate keeps its settings per process; each train() call gets its own (a notebook that
    trains in float32 and then in bf16 must not be refused, nor keep the first run's device)."""
    data = (tiny_decoder_dir, repeated_text_file)
    ccfg = CoprocessorConfig(num_latents=2, num_layers=1)
    for i, precision in enumerate(("no", "bf16", "no")):
        last = train(_cfg(tmp_path / str(i), data, steps=2, save_every=2, precision=precision), ccfg,
                     show_progress=False)
        saved = json.loads((last / "config.json").read_text())
        assert saved["training"]["precision"] == precision and saved["training"]["steps"] == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fused_adamw_skips_a_step_whose_numbers_are_not_finite(bad):
    """The trainer takes a step before its loss reaches the host: `_StepNumbers.bad` as the fused
    AdamW's found_inf leaves weights, moments and step count as they were; a finite step moves them."""
    from cacheaug_core.train import _StepNumbers

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.full((4,), bad)
    opt.found_inf = _StepNumbers(torch.tensor(bad), torch.tensor(bad)).bad
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and float(opt.state[p]["step"]) == 0
    assert torch.isfinite(opt.state[p]["exp_avg"]).all()
    p.grad = torch.ones(4)
    numbers = _StepNumbers(torch.tensor(2.5), torch.tensor(1.0))
    opt.found_inf = numbers.bad
    opt.step()
    assert (p.detach() < 1).all() and float(opt.state[p]["step"]) == 1
    assert numbers.values() == [2.5, 1.0]


# -- resume, output folders and data that does not fit the decoder ----------------------------


def _cli_train(data, out, *extra):
    from cacheaug_core.cli import main

    return main(["train", "--decoder", data[0], "--data", data[1], "--out-dir", str(out), "--seq-len", "48",
                 "--points", "6", "--n-ahead", "4", "--batch-size", "4", "--steps", "6", "--warmup", "2",
                 "--lr", "3e-3", "--eval-every", "0", "--save-every", "3", "--device", "cpu", "--num-latents", "2",
                 "--num-layers", "1", *extra])


def test_cli_resume_takes_the_runs_own_settings(tiny_decoder_dir, repeated_text_file, tmp_path, capsys):
    """`train --out-dir D --resume` needs no other flag: data, decoder, shapes and schedule come from
    D/last. A flag that would change the data stream is refused; --steps may extend the run."""
    from cacheaug_core.cli import main

    data = (tiny_decoder_dir, repeated_text_file)
    assert _cli_train(data, tmp_path / "a") == 0                              # uninterrupted
    assert _cli_train(data, tmp_path / "b", "--stop-after", "3") == 0         # interrupted at step 3
    capsys.readouterr()
    assert main(["train", "--out-dir", str(tmp_path / "b"), "--resume", "--seq-len", "64"]) == 2
    assert "trained with --seq-len 48, not 64" in capsys.readouterr().err
    assert main(["train", "--out-dir", str(tmp_path / "b"), "--resume", "--num-latents", "3"]) == 2
    assert "it has num_latents=2 (asked: num_latents=3)" in capsys.readouterr().err
    assert main(["train", "--out-dir", str(tmp_path / "b"), "--resume"]) == 0
    dec, _, info = load_decoder(tiny_decoder_dir)
    a, b = load_coprocessor(tmp_path / "a" / "last", dec, info), load_coprocessor(tmp_path / "b" / "last", dec, info)
    for k, v in a.trainable_state().items():
        assert torch.equal(v, b.trainable_state()[k]), k
    assert main(["train", "--out-dir", str(tmp_path / "b"), "--resume", "--steps", "8"]) == 0
    assert "--steps 8 replaces the run's 6" in capsys.readouterr().err
    state = json.loads((tmp_path / "b" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["train_config"]["seq_len"] == 48


def test_resume_with_other_data_shapes_is_refused(tiny_decoder_dir, repeated_text_file, tmp_path):
    data = (tiny_decoder_dir, repeated_text_file)
    ccfg = CoprocessorConfig(num_latents=2, num_layers=1)
    train(_cfg(tmp_path, data, stop_after=3), ccfg, show_progress=False)
    with pytest.raises(TrainingError, match="batch_size=4, not 2"):
        train(_cfg(tmp_path, data, resume=True, batch_size=2), ccfg, show_progress=False)


def test_a_new_run_never_overwrites_a_checkpoint(tiny_decoder_dir, repeated_text_file, tmp_path):
    data = (tiny_decoder_dir, repeated_text_file)
    ccfg = CoprocessorConfig(num_latents=2, num_layers=1)
    last = train(_cfg(tmp_path, data, steps=3), ccfg, show_progress=False)
    before = (last / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="use --resume to continue it or another --out-dir"):
        train(_cfg(tmp_path, data, steps=3, seed=1), ccfg, show_progress=False)
    assert (last / "model.safetensors").read_bytes() == before


def test_data_for_another_tokenizer_is_refused(tiny_decoder_dir, tmp_path):
    import types

    import numpy as np

    data = tmp_path / "pack"
    data.mkdir()
    (data / "pack.json").write_text("{}")
    np.full(4096, 60_000, dtype=np.uint16).tofile(data / "train_000.bin")   # ids past the tiny vocabulary
    np.ones(512, dtype=np.uint16).tofile(data / "heldout.bin")
    with pytest.raises(TrainingError, match="holds token id 60000"):
        train(_cfg(tmp_path, (tiny_decoder_dir, str(data))), CoprocessorConfig(num_latents=2, num_layers=1),
              show_progress=False)
    # a prepared corpus: its manifest names the tokenizer it was built with
    _, tok, info = load_decoder(tiny_decoder_dir)
    corpus = types.SimpleNamespace(manifest={"tokenizer": {"vocab_size": info.vocab_size + 1000}})
    with pytest.raises(TrainingError, match="tokenizer of"):
        check_data_tokenizer(corpus, tok, info.vocab_size, "corpus")
    corpus = types.SimpleNamespace(manifest={"tokenizer": {"vocab_size": 10, "fingerprint": "0123456789abcdef"}})
    with pytest.raises(TrainingError, match="another tokenizer"):
        check_data_tokenizer(corpus, tok, info.vocab_size, "corpus")


def test_text_without_tokens_is_refused(tiny_decoder_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TrainingError, match="holds 0 token"):
        train(_cfg(tmp_path, (tiny_decoder_dir, str(empty))), CoprocessorConfig(num_latents=2, num_layers=1),
              show_progress=False)


def test_heldout_summary_names_the_positions_it_averages(tiny_decoder_dir):
    dec, _, _ = load_decoder(tiny_decoder_dir)
    cop = Coprocessor(CoprocessorConfig(num_latents=2, num_layers=1), dec)
    g = torch.Generator().manual_seed(0)
    ev = evaluate_heldout(dec, cop, [torch.randint(1, 90, (2, 32), generator=g)],
                          [masks.sample_points(32, 3, 2, g)], 4)
    assert ev["mean_rel_positions"] == 4
    assert ev["mean_rel_1_16"] == pytest.approx(sum(ev["rel_ppl_change_pct"]) / 4)


# -- trackers and precision through accelerate --------------------------------------------------


def test_report_to_tensorboard_writes_event_files(tiny_decoder_dir, repeated_text_file, tmp_path):
    """--report-to tensorboard: accelerate's tracker writes event files beside metrics.jsonl, with the
    same losses; read back through tensorboard's own reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = (tiny_decoder_dir, repeated_text_file)
    train(_cfg(tmp_path, data, report_to="tensorboard", eval_every=3, eval_batches=1),
          CoprocessorConfig(num_latents=2, num_layers=1), show_progress=False)
    runs = [p.parent for p in (tmp_path / "run" / "cacheaug").rglob("events.out.tfevents.*")]
    assert runs
    ea = EventAccumulator(str(tmp_path / "run" / "cacheaug"))
    ea.Reload()
    losses = {e.step: e.value for e in ea.Scalars("train/loss")}
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    want = {r["step"]: r["loss"] for r in lines if "loss" in r}
    assert losses.keys() == want.keys() and all(abs(losses[k] - v) < 1e-5 for k, v in want.items())
    assert {e.step for e in ea.Scalars("eval/rel_ppl_change_pct/pos1")} == {3, 6}


def test_report_to_a_tracker_that_is_not_installed_is_refused(tiny_decoder_dir, repeated_text_file, tmp_path,
                                                              monkeypatch):
    from accelerate.utils import imports

    from cacheaug_core.config import ConfigError

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    with pytest.raises(TrainingError, match=r"--report-to wandb: not installed .*cacheaug\[track\]"):
        train(_cfg(tmp_path, (tiny_decoder_dir, repeated_text_file), report_to="wandb"),
              CoprocessorConfig(num_latents=2, num_layers=1), show_progress=False)
    assert not (tmp_path / "run").exists()   # refused before anything is loaded or written
    with pytest.raises(ConfigError, match="--report-to takes"):
        _cfg(tmp_path, (tiny_decoder_dir, repeated_text_file), report_to="tensorbord")


def test_precision_defaults_to_the_accelerate_config(tiny_decoder_dir, repeated_text_file, tmp_path, monkeypatch):
    """No --precision: the mixed_precision of the user's `accelerate config` file (accelerate's own
    default location and loader) is the run's; `accelerate launch`'s variable wins over the file and
    an explicit --precision over both."""
    from accelerate.commands.config import config_args

    from cacheaug_core.train import resolve_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    conf = tmp_path / "default_config.yaml"
    conf.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n"
                    "num_processes: 1\nuse_cpu: true\n")
    monkeypatch.setattr(config_args, "default_config_file", str(conf))
    assert resolve_precision("")[0] == "bf16"
    last = train(_cfg(tmp_path, (tiny_decoder_dir, repeated_text_file), steps=2),
                 CoprocessorConfig(num_latents=2, num_layers=1), show_progress=False)
    saved = json.loads((last / "trainer_state.json").read_text())["train_config"]
    assert saved["precision"] == "bf16"
    assert json.loads((last / "config.json").read_text())["training"]["precision"] == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_precision("") == ("fp16", "accelerate launch (ACCELERATE_MIXED_PRECISION)")
    assert resolve_precision("no") == ("no", "--precision")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    conf.write_text(conf.read_text().replace("bf16", "fp8"))
    with pytest.raises(TrainingError, match="mixed precision 'fp8'"):
        resolve_precision("")
    monkeypatch.setattr(config_args, "default_config_file", str(tmp_path / "none.yaml"))
    assert resolve_precision("") == ("no", "default")
