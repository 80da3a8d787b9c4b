"""The package as a user installs it: the built wheel in a clean virtual environment.

    pytest tests/test_packaging.py -m integration      # ~1 minute: builds the 45 MB wheel

The wheel is built from a copy of the checkout (pip's in-tree build leaves build/ behind) without
network (`--no-build-isolation`: the installed setuptools). The clean environment gets the wheel
alone (`--no-deps`); its dependencies come from this interpreter's site-packages through a .pth
line, which adds the folder without running its own .pth files, so this checkout's editable
install is not seen. Run from an empty folder, nothing of the repository is importable there.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "data", "runs", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", "test-artifacts", ".cache", ".gpu", ".gl", "results")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, venv = tmp / "src", tmp / "dist", tmp / "venv"
    shutil.copytree(ROOT, src, symlinks=True, ignore=SKIP)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(dist)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "deps-from-the-test-interpreter.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = list(dist.glob("cacheaug-*.whl"))
    assert len(wheels) == 1
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheels[0])], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    work = tmp / "elsewhere"
    work.mkdir()
    return {"venv": venv, "py": py, "purelib": Path(purelib), "env": env, "cwd": work, "wheel": wheels[0]}


def _run(inst, *cmd):
    return subprocess.run(cmd, cwd=inst["cwd"], env=inst["env"], capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_wheel_installs_one_import_name_with_its_data(installed):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"cacheaug_core", "cacheaug-0.1.0.dist-info"}, top       # no bare viz/ or app.py
    assert "cacheaug_core/app.py" in names and "cacheaug_core/viz/__init__.py" in names
    assert "cacheaug-0.1.0.dist-info/licenses/LICENSE" in names
    r = _run(installed, str(installed["py"]), "-c", (
        "import importlib.util as u, cacheaug_core, cacheaug_core.viz, cacheaug_core.data as d, cacheaug_core.workbench as w;"
        "print(cacheaug_core.__file__); print(u.find_spec('viz'), u.find_spec('app'));"
        "print(d.DEFAULT_MIX.is_file(), (w.SHIPPED_COPROCESSOR / 'config.json').is_file())"))
    assert r.returncode == 0, r.stderr
    where, specs, data = r.stdout.splitlines()
    assert Path(where).is_relative_to(installed["purelib"])               # the wheel's, not this checkout's
    assert specs == "None None" and data == "True True"


@pytest.mark.integration
def test_cacheaug_info_after_a_wheel_install_shows_the_shipped_coprocessor(installed):
    r = _run(installed, str(installed["venv"] / "bin" / "cacheaug"), "info", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    source = Path(st["coprocessor_source"])
    assert source.is_relative_to(installed["purelib"]) and source.name == "coprocessor"
    shipped = json.loads((ROOT / "assets" / "coprocessor" / "config.json").read_text())
    assert st["coprocessor"]["num_latents"] == shipped["coprocessor"]["num_latents"]
    assert st["training"]["steps"] == shipped["training"]["steps"] and "UNTRAINED" not in st["notice"]


def test_quickstart_example_runs_on_a_tiny_model(tiny_decoder_dir, tmp_path):
    """examples/quickstart.py end to end (load, augment, score, plot, generate) on a tiny random
    decoder with an untrained coprocessor, as a user runs it: a script in its own process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--decoder", tiny_decoder_dir,
                        "--out", str(tmp_path / "qs"), "--max-new-tokens", "4"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mean NLL by position ahead" in r.stdout and "=== coprocessor" in r.stdout
    for fig in ("latents_pca.html", "delta_by_position.html"):
        assert "plotly" in (tmp_path / "qs" / fig).read_text()
