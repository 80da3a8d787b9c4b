"""Reliability: damaged checkpoints, interrupted and failing training runs, the app under load.

    pytest tests/test_reliability.py            # about 4-5 minutes on 2 shared CPU cores
    CACHEAUG_KILL_SEED=123 pytest tests/test_reliability.py -k sigkill   # replay one kill point

* Each kind of damaged or mismatched checkpoint gives one clear `CheckpointError` in Python, one
  `cacheaug: error: ...` line and exit status 2 from the CLI (`generate`, `score`), and the same
  message in the app's Model tab (through `gradio_client`), with the loaded model kept.
* Training: a run killed with SIGKILL at a random step and resumed ends bit-identical to an
  uninterrupted one; NaN/inf losses or gradients and a full disk stop with `TrainingError`, keep
  the last good checkpoint, and a resume from it still ends bit-identical.
* A quick version of bench/load_test.py: concurrent clients, zero errors, one model call at a time.

docs/reliability.md describes the guarantees these tests stand for. Everything runs on tiny random
decoders (tests/conftest.py), no network.
"""

from __future__ import annotations

import errno
import html
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cacheaug_core.augment as augment_mod
import cacheaug_core.checkpoint as ck
import cacheaug_core.train as train_mod
from cacheaug_core import cli
from cacheaug_core.checkpoint import CheckpointError, load_coprocessor, save_coprocessor
from cacheaug_core.config import CoprocessorConfig, TrainConfig
from cacheaug_core.coprocessor import Coprocessor
from cacheaug_core.decoder import load_decoder
from cacheaug_core.train import TrainingError, train
from tests.conftest import byte_tokenizer, tiny_decoder

ROOT = Path(__file__).resolve().parent.parent
PICKLE = b"\x80\x04K\x01."  # a valid pickle (the int 1): never unpickled, only refused


# ---------------------------------------------------------------------------------------------
# Damaged and mismatched checkpoints


def _save_decoder(path: Path, hidden: int = 32, layers: int = 2, other_tokenizer: bool = False) -> str:
    """Like conftest.save_tiny_decoder (same weights for the same shape), with optional changes."""
    tok = byte_tokenizer()
    if other_tokenizer:  # same vocabulary and model, one more special-token role: another fingerprint
        tok.add_special_tokens({"bos_token": "<|endoftext|>"})
    model = tiny_decoder("llama", vocab=len(tok), layers=layers, hidden=hidden, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _edit_config(path: Path, fn) -> None:
    c = json.loads((path / "config.json").read_text())
    fn(c)
    (path / "config.json").write_text(json.dumps(c))


def _edit_tensors(path: Path, fn) -> None:
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"))


def _build_cases(root: Path, dec_dir: str) -> dict[str, tuple[Path, list[str]]]:
    """name -> (checkpoint path, phrases its CheckpointError message must contain)."""
    dec, _, info = load_decoder(dec_dir)
    cfg = CoprocessorConfig(num_latents=8, body="copy", num_layers=1)
    good = save_coprocessor(Coprocessor(cfg, dec), root / "good", info)
    load_coprocessor(good, dec, info)  # the undamaged original loads
    cases: dict[str, tuple[Path, list[str]]] = {}

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, root / name))

    def add(name, path, *phrases):
        cases[name] = (Path(path), list(phrases))

    p = root / "coprocessor.pt"
    p.write_bytes(PICKLE)
    add("pickled .pt file", p, "pickled", "refused", "safetensors")
    p = root / "pickled-folder"
    p.mkdir()
    (p / "pytorch_model.bin").write_bytes(PICKLE)
    add("pickled .bin folder", p, "pickled", "refused", "safetensors")
    p = copy("pickled-with-config")
    (p / "model.safetensors").unlink()
    (p / "pytorch_model.bin").write_bytes(PICKLE)
    add("pickled .bin next to config.json", p, "pickled", "refused", "safetensors")

    p = copy("truncated")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    add("truncated safetensors", p, "model.safetensors is truncated or corrupted")
    p = copy("corrupt-header")
    data = bytearray((p / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (p / "model.safetensors").write_bytes(bytes(data))
    add("corrupted safetensors header", p, "model.safetensors is truncated or corrupted")
    p = copy("corrupt-data")
    data = bytearray((p / "model.safetensors").read_bytes())
    data[-64:-32] = b"\x13" * 32  # inside the tensor data: the file still parses, values are wrong
    (p / "model.safetensors").write_bytes(bytes(data))
    add("corrupted safetensors data bytes", p, "model.safetensors is corrupted", "sha256")

    p = copy("no-config")
    (p / "config.json").unlink()
    add("missing config.json", p, "has no config.json")
    p = copy("bad-json")
    (p / "config.json").write_text('{"format": "cacheaug-coprocessor", "coprocessor": {')
    add("malformed config.json (not JSON)", p, "config.json is not valid JSON")
    p = copy("bad-type")
    _edit_config(p, lambda c: c["coprocessor"].update(num_latents="eight"))
    add("malformed config.json (wrong type)", p, "coprocessor.num_latents is 'eight', expected an integer")
    p = copy("bad-key")
    _edit_config(p, lambda c: c["coprocessor"].update(num_latentz=8))
    add("malformed config.json (unknown key)", p, "unknown CoprocessorConfig keys", "num_latentz")
    p = copy("no-section")
    _edit_config(p, lambda c: c.pop("decoder"))
    add("malformed config.json (no decoder section)", p, "lacks the 'decoder' section")

    for what, kw, phrase in (("hidden size", {"hidden": 64}, "hidden_size 64"),
                             ("layer count", {"layers": 3}, "num_layers 3"),
                             ("tokenizer only", {"other_tokenizer": True}, "tokenizer fingerprint")):
        other_dir = _save_decoder(root / f"decoder-{what.replace(' ', '-')}", **kw)
        d2, _, i2 = load_decoder(other_dir)
        p = save_coprocessor(Coprocessor(cfg, d2), root / f"for-other-{what.replace(' ', '-')}", i2)
        add(f"another decoder ({what})", p, "trained for decoder", phrase, "Load the decoder it was trained for")

    p = save_coprocessor(Coprocessor(CoprocessorConfig(num_latents=16, body="copy", num_layers=1), dec),
                         root / "num-latents", info)
    _edit_config(p, lambda c: c["coprocessor"].update(num_latents=8))
    add("wrong num_latents (config 8, tensors 16)", p, "config.json says num_latents=8", "16 soft tokens")
    p = copy("body")
    _edit_config(p, lambda c: c["coprocessor"].update(body="lora"))
    add("wrong body (config lora, tensors of copy)", p, "do not match config.json (body=lora", "missing tensors",
        "lora_A")
    p = copy("missing-key")
    _edit_tensors(p, lambda t: t.pop("out_proj.bias"))
    add("missing tensor key", p, "missing tensors ['out_proj.bias']")
    p = copy("unexpected-key")
    _edit_tensors(p, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    add("unexpected tensor key", p, "unexpected tensors ['extra.weight']")
    for bad in ("nan", "inf"):
        p = copy(f"weights-{bad}")
        _edit_tensors(p, lambda t: t["out_proj.weight"].__setitem__((3, 4), float(bad)))
        add(f"{bad} weights", p, "tensor out_proj.weight holds NaN or inf")
    return cases


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_decoder_dir):
    root = tmp_path_factory.mktemp("bad-checkpoints")
    return _build_cases(root, tiny_decoder_dir)


CASE_NAMES = [
    "pickled .pt file", "pickled .bin folder", "pickled .bin next to config.json", "truncated safetensors",
    "corrupted safetensors header", "corrupted safetensors data bytes", "missing config.json",
    "malformed config.json (not JSON)", "malformed config.json (wrong type)", "malformed config.json (unknown key)",
    "malformed config.json (no decoder section)", "another decoder (hidden size)", "another decoder (layer count)",
    "another decoder (tokenizer only)", "wrong num_latents (config 8, tensors 16)",
    "wrong body (config lora, tensors of copy)", "missing tensor key", "unexpected tensor key", "nan weights",
    "inf weights",
]


@pytest.fixture(scope="module")
def messages(bad, tiny_decoder_dir):
    """The CheckpointError message of each case, loading in Python."""
    dec, _, info = load_decoder(tiny_decoder_dir)
    out = {}
    for name, (path, _) in bad.items():
        with pytest.raises(CheckpointError) as e:
            load_coprocessor(path, dec, info)
        out[name] = str(e.value)
    return out


def test_the_case_list_is_complete(bad):
    assert sorted(bad) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_python_gives_one_clear_checkpoint_error(name, bad, messages):
    msg = messages[name]
    for phrase in bad[name][1]:
        assert phrase in msg, f"{name}: {msg}"
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 700, msg


def test_export_refuses_corrupted_weights(bad, tmp_path):
    """A corrupted checkpoint must not be re-exported with a fresh, matching checksum."""
    with pytest.raises(CheckpointError, match="sha256"):
        ck.export_checkpoint(bad["corrupted safetensors data bytes"][0], tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_checkpoints_without_checksums_still_load(tiny_decoder_dir, tmp_path):
    """Folders saved before checksums were recorded are not refused, and load the same weights."""
    dec, _, info = load_decoder(tiny_decoder_dir)
    cop = Coprocessor(CoprocessorConfig(num_latents=2, num_layers=1), dec)
    p = save_coprocessor(cop, tmp_path / "ck", info)
    _edit_config(p, lambda c: c.pop("weights_sha256"))
    loaded = load_coprocessor(p, dec, info)
    want, got = cop.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k].to(got[k].dtype), got[k]) for k in want)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("cacheaug: error:")]


def test_cli_generate_and_score_print_one_error_line(bad, messages, tiny_decoder_dir, capsys):
    for name in CASE_NAMES:
        path = str(bad[name][0])
        for argv in (["generate", "--decoder", tiny_decoder_dir, "--coprocessor", path, "--prompt", "x",
                      "--max-new-tokens", "1"],
                     ["score", "--decoder", tiny_decoder_dir, "--coprocessor", path, "--text", "some text here"]):
            rc = cli.main(argv)
            out, err = capsys.readouterr()
            assert rc == 2, (name, argv[0], rc)
            assert _error_lines(err) == [f"cacheaug: error: {messages[name]}"], (name, argv[0], err[-2000:])
            assert "Traceback" not in err and out == "", (name, out)


def test_cli_process_exit_status(bad, tiny_decoder_dir):
    """The real command in its own process: status 2, the last line is the error, no traceback."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmds = {
        "generate": ["generate", "--decoder", tiny_decoder_dir, "--coprocessor",
                     str(bad["corrupted safetensors data bytes"][0]), "--prompt", "x"],
        "score": ["score", "--decoder", tiny_decoder_dir, "--coprocessor", str(bad["pickled .pt file"][0]),
                  "--text", "some text"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "cacheaug_core.cli", *v], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, v in cmds.items()}
    for k, p in procs.items():
        out, err = p.communicate(timeout=240)
        assert p.returncode == 2, (k, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("cacheaug: error: ") and "Traceback" not in err, (k, err[-2000:])
        assert ("sha256" if k == "generate" else "pickled") in last


def test_app_model_tab_shows_the_message_and_keeps_the_model(bad, messages, tiny_decoder_dir):
    """/load_model with each damaged checkpoint: the tab's error shows the Python message; the
    loaded model stays. (A pickled folder and a GPT-2 checkpoint are in test_app_api.py.)"""
    gradio_client = pytest.importorskip("gradio_client")
    import socket

    from cacheaug_core import app
    from cacheaug_core.workbench import Workbench

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_demo(Workbench.load(decoder=tiny_decoder_dir))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        client = gradio_client.Client(url, verbose=False, download_files=False)
        for name in CASE_NAMES:
            if name == "pickled .bin folder":
                continue
            banner, status, card, evaluation, err = client.predict(tiny_decoder_dir, str(bad[name][0]),
                                                                   api_name="/load_model")
            shown = html.unescape(err)
            assert messages[name] in shown, (name, shown)
            assert "Traceback" not in shown and "Last load failed" in banner, name
            assert status["coprocessor_source"] == "untrained", name     # the old model is still loaded
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------
# Training: failures keep the last good checkpoint; resuming from it ends where an uninterrupted run ends


def _cfg(out: Path, dec: str, data: str, **kw) -> TrainConfig:
    base = dict(decoder=dec, data=data, out_dir=str(out), seq_len=48, points=6, n_ahead=4, batch_size=4, steps=6,
                warmup=2, lr=3e-3, eval_every=0, save_every=3, log_every=1, device="cpu")
    return TrainConfig(**(base | kw))


COP = CoprocessorConfig(num_latents=2, num_layers=1)


def _state(last: Path) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds as tensors: the weights and the trainer state."""
    return {f"model/{k}": v for k, v in load_file(str(last / "model.safetensors")).items()} | {
        f"trainer/{k}": v for k, v in load_file(str(last / "trainer_state.safetensors")).items()}


def _assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_decoder_dir, repeated_text_file):
    out = tmp_path_factory.mktemp("reference")
    last = train(_cfg(out, tiny_decoder_dir, repeated_text_file), COP, show_progress=False)
    return _state(last)


def _nan_loss(monkeypatch, at_call: int, value: float):
    real, calls = augment_mod.multi_point_loss, {"n": 0}

    def fake(*a, **kw):
        loss, nll = real(*a, **kw)
        calls["n"] += 1
        return (loss * value if calls["n"] == at_call else loss), nll

    monkeypatch.setattr(augment_mod, "multi_point_loss", fake)


def _nan_grad(monkeypatch, at_call: int):
    real, calls = augment_mod.multi_point_loss, {"n": 0}

    def fake(decoder, cop, *a, **kw):
        loss, nll = real(decoder, cop, *a, **kw)
        calls["n"] += 1
        if calls["n"] == at_call:
            # value + 0, gradient 0 * d sqrt(x)/dx at 0 = 0 * inf = NaN: a finite loss with NaN gradients
            p = next(q for q in cop.parameters() if q.requires_grad)
            loss = loss + torch.sqrt((p * 0).sum())
        return loss, nll

    monkeypatch.setattr(augment_mod, "multi_point_loss", fake)


def _full_disk(monkeypatch, module, at_call: int):
    real, calls = module.save_file, {"n": 0}

    def fake(*a, **kw):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **kw)

    monkeypatch.setattr(module, "save_file", fake)


FAILURES = {
    # name: (set up the failure, phrases of the TrainingError)
    "nan loss at step 5": (lambda mp: _nan_loss(mp, 5, float("nan")), ["loss became nan at step 4"]),
    "inf loss at step 5": (lambda mp: _nan_loss(mp, 5, float("inf")), ["loss became inf at step 4"]),
    "nan gradients at step 5": (lambda mp: _nan_grad(mp, 5), ["gradient norm became nan at step 4"]),
    "disk full writing the weights (2nd save)": (lambda mp: _full_disk(mp, ck, 2),
                                                 ["No space left on device", "Free disk space"]),
    "disk full writing the trainer state (2nd save)": (lambda mp: _full_disk(mp, train_mod, 2),
                                                       ["No space left on device", "Free disk space"]),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_failure_keeps_the_last_good_checkpoint(name, reference, tiny_decoder_dir, repeated_text_file, tmp_path,
                                                monkeypatch):
    setup, phrases = FAILURES[name]
    cfg = _cfg(tmp_path / "run", tiny_decoder_dir, repeated_text_file)
    last = tmp_path / "run" / "last"
    with monkeypatch.context() as mp:
        setup(mp)
        with pytest.raises(TrainingError) as e:
            train(cfg, COP, show_progress=False)
    msg = str(e.value)
    for phrase in phrases + ["last good checkpoint is kept"]:
        assert phrase in msg, msg
    # The step-3 checkpoint is intact and complete: weights, trainer state, nothing half-written around it.
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 3
    dec, _, info = load_decoder(tiny_decoder_dir)
    load_coprocessor(last, dec, info)
    assert sorted(x.name for x in last.parent.iterdir() if x.name.startswith(".")) == []
    # ... and resuming from it ends exactly where the uninterrupted run ends.
    resumed = train(_cfg(tmp_path / "run", tiny_decoder_dir, repeated_text_file, resume=True), COP,
                    show_progress=False)
    _assert_identical(_state(resumed), reference)


def test_cli_reports_a_training_error_in_one_line(tiny_decoder_dir, repeated_text_file, tmp_path, monkeypatch,
                                                  capsys):
    _nan_loss(monkeypatch, 2, float("nan"))
    rc = cli.main(["train", "--decoder", tiny_decoder_dir, "--data", repeated_text_file, "--out-dir",
                   str(tmp_path / "run"), "--seq-len", "48", "--points", "6", "--n-ahead", "4", "--batch-size", "4",
                   "--steps", "4", "--save-every", "1", "--eval-every", "0", "--device", "cpu", "--num-latents", "2",
                   "--num-layers", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = _error_lines(err)
    assert len(lines) == 1 and "loss became nan at step 1" in lines[0] and "Traceback" not in err


def test_a_step_is_checked_while_the_next_one_runs(tiny_decoder_dir, repeated_text_file, tmp_path, monkeypatch):
    """One process with the fused AdamW: a step is taken before its loss reaches the host (the
    optimizer itself skips a non-finite one) and checked once the next step is queued, so a NaN
    at the 2nd step stops the run after the 3rd step's forward, naming the 2nd, with nothing saved."""
    calls = []
    real = augment_mod.multi_point_loss

    def counted(*a, **kw):
        calls.append(1)
        loss, nll = real(*a, **kw)
        return (loss * float("nan") if len(calls) == 2 else loss), nll

    monkeypatch.setattr(augment_mod, "multi_point_loss", counted)
    cfg = _cfg(tmp_path / "run", tiny_decoder_dir, repeated_text_file, save_every=100)
    with pytest.raises(TrainingError, match="loss became nan at step 1"):
        train(cfg, COP, show_progress=False)
    assert len(calls) == 3 and not (tmp_path / "run" / "last").exists()


def test_kill_between_the_two_renames_is_recovered(reference, tiny_decoder_dir, repeated_text_file, tmp_path):
    """Replacing `last/` takes two renames (old aside, new in place). Killed between them, only
    `.last.old` exists (plus an unfinished temporary folder); the next run restores and resumes."""
    run = tmp_path / "run"
    train(_cfg(run, tiny_decoder_dir, repeated_text_file, stop_after=3), COP, show_progress=False)
    (run / "last").rename(run / ".last.old")
    (run / ".last.tmp-killed").mkdir()
    (run / ".last.tmp-killed" / "model.safetensors").write_bytes(b"\x00" * 10)
    resumed = train(_cfg(run, tiny_decoder_dir, repeated_text_file, resume=True), COP, show_progress=False)
    _assert_identical(_state(resumed), reference)
    assert sorted(x.name for x in run.iterdir() if x.name.startswith(".")) == []


def _last_logged_step(metrics: Path) -> int:
    step = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                step = max(step, json.loads(line).get("step", 0))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return step


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny_decoder_dir, repeated_text_file, tmp_path):
    """`cacheaug train` in its own process, SIGKILLed at a random step after its first checkpoint,
    then `--resume`d: the weights and trainer state equal those of an uninterrupted run."""
    seed = int(os.environ.get("CACHEAUG_KILL_SEED", random.SystemRandom().randrange(1_000_000)))
    steps, save_every = 60, 4
    kill_at = random.Random(seed).randrange(save_every + 1, steps - 8)
    why = f"CACHEAUG_KILL_SEED={seed} (kill at step >= {kill_at})"

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "cacheaug_core.cli", "train", "--decoder", tiny_decoder_dir, "--data",
                repeated_text_file, "--out-dir", str(out), "--seq-len", "48", "--points", "6", "--n-ahead", "4",
                "--batch-size", "4", "--steps", str(steps), "--warmup", "2", "--lr", "3e-3", "--eval-every", "0",
                "--save-every", str(save_every), "--log-every", "1", "--device", "cpu", "--num-latents", "2",
                "--num-layers", "1", *extra]

    # One thread per process: both runs do the same arithmetic in the same order.
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def start(out: Path, *extra: str) -> subprocess.Popen:
        log = open(tmp_path / f"{out.name}{'-'.join(extra)}.log", "w")  # a file, not a pipe that could fill up
        return subprocess.Popen(cmd(out, *extra), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    full = start(tmp_path / "full")
    victim = start(tmp_path / "killed")
    killed = tmp_path / "killed"
    deadline = time.time() + 300
    while not (_last_logged_step(killed / "metrics.jsonl") >= kill_at and (killed / "last" / "config.json").exists()):
        assert victim.poll() is None, f"the run ended before it was killed; {why}"
        assert time.time() < deadline, f"no progress; {why}"
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait(60)
    assert victim.returncode == -signal.SIGKILL
    saved = json.loads((killed / "last" / "trainer_state.json").read_text())["step"]
    logged = _last_logged_step(killed / "metrics.jsonl")
    assert saved < steps and logged < steps, f"not killed mid-run; {why}"

    resumed = start(killed, "--resume")
    assert resumed.wait(300) == 0, (tmp_path / "killed--resume.log").read_text()[-3000:]
    assert full.wait(300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    a, b = _state(tmp_path / "full" / "last"), _state(killed / "last")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from step {saved} (killed at {logged}); {why}"
    assert sorted(a) == sorted(b)
    assert json.loads((killed / "last" / "trainer_state.json").read_text())["step"] == steps


# ---------------------------------------------------------------------------------------------
# The app under concurrent load (quick version of bench/load_test.py)


def test_load_quick():
    pytest.importorskip("gradio_client")
    sys.path.insert(0, str(ROOT / "bench"))  # also for the server process, which imports load_test.serve
    try:
        import load_test

        res = load_test.run(clients=4, requests=3, seed=1, sample_every=0.2, burst=0)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert res["errors"] == 0 and res["warmup_errors"] == [], res["error_examples"] or res["warmup_errors"]
    assert res["requests"] == 12
    assert all(res["latency_by_endpoint"][e]["n"] >= 2 for e in load_test.ENDPOINTS)
    q = res["queue"]
    assert q["max_model_calls_running_at_once"] == 1 and q["model_calls"] >= 12
    assert q["max_requests_in_flight_client_side"] >= 2      # the clients really overlapped
    rss = res["server_rss_mib"]
    assert rss["samples"] >= 3 and 0 < rss["start"] <= rss["peak"]


def test_keep_freed_memory_on_glibc():
    """The CPU allocator setting takes on glibc (Linux) and is a no-op elsewhere; allocating and
    freeing large tensors afterwards works as before."""
    import platform

    from cacheaug_core.decoder import keep_freed_memory

    took = keep_freed_memory()
    assert isinstance(took, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert took
    for _ in range(3):
        x = torch.ones(4 << 20)          # 16 MiB: below the 32 MiB threshold, reused from the heap
        assert float(x.sum()) == float(4 << 20)
        del x


def test_checkpoint_folders_follow_the_umask(tmp_path):
    """A saved checkpoint is readable by others under a usual umask (mkdtemp alone would make it 0700)."""
    import os
    import stat

    from cacheaug_core.checkpoint import atomic_dir_write

    old = os.umask(0o022)
    try:
        out = atomic_dir_write(tmp_path / "ck", lambda d: (d / "config.json").write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644
