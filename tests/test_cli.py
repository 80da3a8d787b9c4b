"""The `cacheaug` command, subcommand by subcommand, run in-process through `cacheaug_core.cli.main`.

Each test runs on a tiny random Llama-style decoder saved as a transformers folder and untrained
coprocessor / pause-token checkpoints saved with `checkpoint.save_coprocessor`, so the whole file
takes seconds and needs no download:

    .venv/bin/python -m pytest tests/test_cli.py -q

User errors (a missing checkpoint folder, an empty prompt) must exit with status 2 and print one
line, never a traceback.
"""

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cacheaug_core.checkpoint import read_config, save_coprocessor
from cacheaug_core.cli import main
from cacheaug_core.config import CoprocessorConfig
from cacheaug_core.coprocessor import Coprocessor
from conftest import save_tiny_decoder

TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(decoder dir, coprocessor checkpoint dir, pause checkpoint dir), all tiny and untrained."""
    from cacheaug_core.decoder import load_decoder

    root = tmp_path_factory.mktemp("climodels")
    dec_dir = save_tiny_decoder(root / "dec", "llama")
    dec, _, info = load_decoder(dec_dir)
    cop = Coprocessor(CoprocessorConfig(num_latents=3, num_layers=1), dec)
    save_coprocessor(cop, root / "cop", info, status="untrained test coprocessor",
                     training={"steps": 7, "lr": 0.001}, evaluation={"held-out": {"ppl_decoder": 9.5}})
    pause = Coprocessor(CoprocessorConfig(num_latents=2, body="none"), dec)
    save_coprocessor(pause, root / "pause", info)
    return dec_dir, str(root / "cop"), str(root / "pause")


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr)."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def model_args(models):
    dec, cop, _ = models
    return ["--decoder", dec, "--coprocessor", cop]


def assert_one_line_error(rc, err, *fragments):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("cacheaug: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0]


# -- generate ---------------------------------------------------------------------------------


def test_generate_text(models, capsys):
    rc, out, err = run(capsys, "generate", "--prompt", "Hello there", "--max-new-tokens", "4", "--no-chat",
                       *model_args(models))
    assert rc == 0
    assert "=== decoder  [ttft" in out and f"=== decoder + coprocessor ({models[1]})" in out
    assert "untrained test coprocessor" in err  # the checkpoint's status is shown as a note


def test_generate_json_with_pause_arm(models, capsys):
    rc, out, _ = run(capsys, "generate", "--prompt", "Hello there", "--max-new-tokens", "5", "--no-chat", "--json",
                     "--pause", models[2], *model_args(models))
    assert rc == 0
    res = json.loads(out)
    assert set(res) == {"decoder", "coprocessor", "pause"}
    for name, arm in res.items():
        assert arm["arm"] == name and 1 <= arm["tokens"] <= 5 and isinstance(arm["text"], str)
        assert arm["time_to_first_token_s"] >= 0


def test_generate_text_shows_pause_arm(models, capsys):
    rc, out, _ = run(capsys, "generate", "--prompt", "Hi", "--max-new-tokens", "2", "--no-chat",
                     "--pause", models[2], *model_args(models))
    assert rc == 0 and f"=== decoder + pause tokens ({models[2]})" in out


# -- score ------------------------------------------------------------------------------------


def test_score_once_with_exports(models, tmp_path, capsys):
    csv_path, js, fig = tmp_path / "t.csv", tmp_path / "t.json", tmp_path / "t.html"
    rc, out, _ = run(capsys, "score", "--text", TEXT, "--point", "5", "--csv", str(csv_path), "--json", str(js),
                     "--html", str(fig), *model_args(models))
    assert rc == 0
    n = len(TEXT.encode())  # the byte tokenizer: one token per byte
    assert f"augmented after token 5; scored {n - 6} tokens" in out and "relative change %" in out
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert len(rows) == n and rows[0].keys() >= {"index", "token", "nll_base", "nll_aug", "delta"}
    res = json.loads(js.read_text())
    assert res["mode"] == "once" and res["point"] == 5 and len(res["by_position"]) == n - 6
    prov = res["provenance"]           # a results file says what made it
    assert prov["arguments"]["point"] == 5 and prov["device"].startswith("cpu") and "commit" in prov["git"]
    assert prov["decoder"]["name"] == models[0] and prov["coprocessor"]["source"] == models[1]
    assert "<html" in fig.read_text()[:2000].lower()


def test_score_every(models, tmp_path, capsys):
    csv_path, js = tmp_path / "m.csv", tmp_path / "m.json"
    rc, out, _ = run(capsys, "score", "--text", TEXT, "--every", "--positions", "4", "--csv", str(csv_path),
                     "--json", str(js), *model_args(models))
    assert rc == 0
    n = len(TEXT.encode())
    assert f"augmented after each of {n - 1} tokens; token n ahead scored for n = 1..4" in out
    header = next(line for line in out.splitlines() if "position" in line)
    assert {"position", "n", "nll_base", "nll_aug", "delta"} <= set(header.split())
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    # every (point, ahead) cell inside the text: n-1 points, minus the ones running past the end
    assert len(rows) == sum(min(4, n - 1 - p) for p in range(n - 1))
    assert {r["ahead"] for r in rows} == {"1", "2", "3", "4"}
    r = rows[0]
    assert int(r["token_index"]) == int(r["point"]) + int(r["ahead"])
    assert float(r["delta"]) == pytest.approx(float(r["nll_aug"]) - float(r["nll_base"]), abs=1e-5)
    res = json.loads(js.read_text())
    assert res["mode"] == "every" and res["positions"] == 4 and len(res["nll_aug_by_point"]) == n - 1
    assert [row["position"] for row in res["by_position"]] == [1, 2, 3, 4]


def test_score_empty_text_is_one_line(models, capsys):
    rc, _, err = run(capsys, "score", "--text", "   ", *model_args(models))
    assert_one_line_error(rc, err, "empty")


# -- latents ----------------------------------------------------------------------------------


def test_latents(models, tmp_path, capsys):
    js, fig, attn = tmp_path / "lat.json", tmp_path / "pca.html", tmp_path / "attn.html"
    rc, out, _ = run(capsys, "latents", "--prompt", "Why is the sky blue?", "--prompt", "What is 17 + 25?",
                     "--top-k", "3", "--continuation", " Because of scattering.", "--json", str(js),
                     "--html", str(fig), "--attention-html", str(attn), *model_args(models))
    assert rc == 0
    assert "2 prompt(s) x 3 latents; Explained variance: PC1" in out
    assert "attention from the 23 continuation tokens" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["prompt", "latent"])
    assert {"#1", "p#1", "#3", "p#3"} <= set(lines[header].split())
    res = json.loads(js.read_text())
    assert res["prompts"] == ["Why is the sky blue?", "What is 17 + 25?"]
    assert len(res["latents"]) == 6 and len(res["pca"]) == 6 and len(res["pca"][0]) == 2
    assert len(res["readout"]) == 6 and res["prompt_ids"] == [0, 0, 0, 1, 1, 1]
    assert len(res["attention_to_latents"]["mass"]) == 23
    assert res["provenance"]["arguments"]["prompt"] == res["prompts"] and res["provenance"]["coprocessor"]
    assert "plotly" in fig.read_text() and "plotly" in attn.read_text()


def test_latents_on_reference_axes(models, tmp_path, capsys):
    from sklearn.decomposition import PCA

    from cacheaug_core.workbench import REFERENCE_PROMPTS, Workbench

    outs = []
    for prompts in (["Why is the sky blue?"], ["Why is the sky blue?", "What is 17 + 25?"]):
        js = tmp_path / f"lat{len(prompts)}.json"
        args = [x for p in prompts for x in ("--prompt", p)]
        rc, out, _ = run(capsys, "latents", *args, "--axes", "reference", "--json", str(js), *model_args(models))
        assert rc == 0 and "reference axes (8 fixed prompts)" in out
        outs.append(json.loads(js.read_text()))
    np.testing.assert_allclose(outs[0]["pca"], outs[1]["pca"][:3], atol=1e-5)     # runs share the axes
    wb = Workbench.load(models[0], models[1])
    pca = PCA(2).fit(wb.latents(list(REFERENCE_PROMPTS))["latents"])
    np.testing.assert_allclose(outs[0]["pca"], pca.transform(wb.latents(["Why is the sky blue?"])["latents"]),
                               atol=1e-4)


def test_latents_empty_prompt_is_one_line(models, capsys):
    rc, _, err = run(capsys, "latents", "--prompt", "ok", "--prompt", "", *model_args(models))
    assert_one_line_error(rc, err, "empty")


# -- info -------------------------------------------------------------------------------------


def test_info(models, capsys):
    rc, out, _ = run(capsys, "info", "--pause", models[2], *model_args(models))
    assert rc == 0
    for heading in ("## Decoder", f"## Coprocessor ({models[1]})", f"## Pause-token arm ({models[2]})",
                    "## Status", "## Training", "## Evaluation"):
        assert heading in out
    assert "| model_type | llama |" in out and "| num_latents | 3 |" in out and "| body | none |" in out
    assert "untrained test coprocessor" in out and "| steps | 7 |" in out
    assert "#### held-out" in out and "| ppl_decoder | 9.5 |" in out


def test_info_json(models, capsys):
    rc, out, _ = run(capsys, "info", "--json", *model_args(models))
    assert rc == 0
    st = json.loads(out)
    assert st["coprocessor_source"] == models[1] and st["coprocessor"]["num_latents"] == 3
    assert st["decoder"]["hidden_size"] == 32 and st["training"]["steps"] == 7 and st["pause"] is None


# -- export -----------------------------------------------------------------------------------


def test_export_and_reload(models, tmp_path, capsys):
    dst = tmp_path / "exported"
    rc, out, _ = run(capsys, "export", models[1], str(dst), "--dtype", "bf16", "--status", "shipped for a test")
    assert rc == 0 and out.startswith(f"{dst}:") and "MiB of weights" in out
    assert read_config(dst)["status"] == "shipped for a test"
    rc, out, _ = run(capsys, "info", "--decoder", models[0], "--coprocessor", str(dst))
    assert rc == 0 and "shipped for a test" in out


# -- errors and the app's arguments -----------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "hi"],
    ["score", "--text", "hi there"],
    ["latents", "--prompt", "hi"],
    ["info"],
])
def test_missing_checkpoint_folder_is_one_line(models, tmp_path, capsys, argv):
    missing = tmp_path / "no-such-checkpoint"
    rc, out, err = run(capsys, *argv, "--decoder", models[0], "--coprocessor", str(missing))
    assert_one_line_error(rc, err, "no checkpoint folder", str(missing))
    assert out == ""


def test_missing_pause_folder_and_export_source(models, tmp_path, capsys):
    rc, _, err = run(capsys, "generate", "--prompt", "hi", "--pause", str(tmp_path / "nope"), *model_args(models))
    assert_one_line_error(rc, err, "no checkpoint folder")
    rc, _, err = run(capsys, "export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert_one_line_error(rc, err)


def test_generate_empty_prompt_is_one_line(models, capsys):
    rc, out, err = run(capsys, "generate", "--prompt", "", *model_args(models))
    assert_one_line_error(rc, err, "empty")
    assert out == ""


def test_app_passes_the_port_only_when_given(monkeypatch):
    seen = []
    # A stand-in `app` module: importing the real one (Gradio) takes seconds and is tested elsewhere.
    monkeypatch.setitem(sys.modules, "cacheaug_core.app", types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0))
    assert main(["app"]) == 0
    assert main(["app", "--port", "8123", "--pause", "p", "--coprocessor", "c"]) == 0
    assert "--port" not in seen[0]  # app.py then takes $GRADIO_SERVER_PORT, else 7860
    assert seen[1][:2] == ["--port", "8123"] and seen[1][-2:] == ["--pause", "p"] and "c" in seen[1]


CONFIGS = Path(__file__).parent.parent / "configs"
TRAIN_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "mix.yaml")   # mix.yaml: the data mix


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_training_configs_are_valid(name):
    """Every recipe in configs/ names only real options and passes their checks, as
    `cacheaug train --config` reads it."""
    from cacheaug_core.config import TrainConfig, load_yaml

    y = load_yaml(CONFIGS / name)
    assert set(y) <= {"train", "coprocessor"} and y
    TrainConfig(**y.get("train", {}))
    CoprocessorConfig(**y.get("coprocessor", {}))


# -- export never replaces user data ----------------------------------------------------------


def test_export_refuses_to_replace_user_data(models, tmp_path, capsys, monkeypatch):
    src = Path(models[1])
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me too")
    cases = [(notes, "is a file"), (folder, "not a cacheaug checkpoint"), (src, "is the source"),
             (src.parent, "holds the source")]
    for dst, phrase in cases:
        rc, _, err = run(capsys, "export", str(src), str(dst))
        assert_one_line_error(rc, err, phrase)
    monkeypatch.chdir(folder)          # the working directory itself, given as "."
    rc, _, err = run(capsys, "export", str(src), ".")
    assert_one_line_error(rc, err, "working directory")
    assert notes.read_text() == "keep me" and (folder / "thesis.tex").read_text() == "keep me too"
    assert read_config(src)["format"] == "cacheaug-coprocessor"
    # an earlier export may be replaced
    dst = tmp_path / "exported"
    assert run(capsys, "export", str(src), str(dst))[0] == 0
    rc, _, _ = run(capsys, "export", str(src), str(dst), "--status", "second export")
    assert rc == 0 and read_config(dst)["status"] == "second export"


# -- train: options from YAML and flags -------------------------------------------------------


@pytest.mark.parametrize("yaml_text, phrase", [
    ("train:\n  steps: \"2\"\n", "steps is '2' (str), expected an integer"),
    ("train:\n  fast: \"no\"\n", "fast is 'no' (str), expected true or false"),
    ("coprocessor:\n  num_latents: 2.5\n", "num_latents is 2.5 (float), expected an integer"),
    ("train:\n  lr: fast\n", "lr is 'fast' (str), expected a number"),
    ("train: 5\n", "'train:' section must be a mapping"),
    ("train:\n  steps: [1\n", "not valid YAML at line"),
])
def test_train_config_errors_are_one_line(tmp_path, capsys, yaml_text, phrase):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    rc, _, err = run(capsys, "train", "--config", str(cfg), "--data", str(tmp_path / "none.txt"),
                     "--out-dir", str(tmp_path / "run"))
    assert_one_line_error(rc, err, phrase)


def test_yaml_numbers_written_without_a_dot_are_numbers():
    """YAML 1.1 reads `2e-4` as a string; a float option takes it as the number it spells."""
    from cacheaug_core.config import TrainConfig, check_types

    assert check_types(TrainConfig, {"lr": "2e-4", "max_minutes": 3, "seq_len": 64}, "x.yaml") == {
        "lr": 2e-4, "max_minutes": 3.0, "seq_len": 64}


@pytest.mark.parametrize("device, phrase", [("gpu", "--device must be cpu, cuda or cuda:N"),
                                            ("cuda:x", "--device must be cpu, cuda or cuda:N"),
                                            ("cuda", "CUDA is not available")])
def test_train_device_is_checked(models, tmp_path, capsys, device, phrase):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    rc, _, err = run(capsys, "train", "--decoder", models[0], "--data", str(data), "--out-dir", str(tmp_path / "r"),
                     "--device", device)
    assert_one_line_error(rc, err, phrase)


# -- inputs that are not what they should be --------------------------------------------------


def test_score_file_that_is_a_folder_or_not_utf8(models, tmp_path, capsys):
    rc, _, err = run(capsys, "score", "--file", str(tmp_path), *model_args(models))
    assert_one_line_error(rc, err, "is a folder")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 au lait, s'il vous pla\xeet. ".encode("latin-1") * 3)
    rc, out, err = run(capsys, "score", "--file", str(latin1), "--point", "3", *model_args(models))
    assert rc == 0 and "augmented after token 3" in out
    assert "not valid UTF-8" in err and "Traceback" not in err


def test_score_prints_the_truncation_notice(models, capsys):
    rc, _, err = run(capsys, "score", "--text", "ab " * 7000, "--point", "2", *model_args(models))
    assert rc == 0 and "note: Input truncated from 21,000 to 20,000 characters" in err


def test_prepare_data_into_a_file_and_points_per_pass_zero(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    rc, _, err = run(capsys, "prepare-data", "--out", str(f))
    assert_one_line_error(rc, err, "is a file")
    assert f.read_text() == "keep me"
    rc, _, err = run(capsys, "eval", "ppl", "--text", str(f), "--json", str(tmp_path / "o.json"),
                     "--points-per-pass", "0")
    assert_one_line_error(rc, err, "--points-per-pass must be at least 1")
