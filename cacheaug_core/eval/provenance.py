"""The models under test and the record of what produced a result: loading the decoder, coprocessor
and pause arm on a device and dtype, the provenance every `cacheaug eval` JSON carries (command,
arguments, git commit, device, models, library versions, time) and strict JSON output.

    from cacheaug_core.eval.provenance import load_models, provenance, write_json
    wb = load_models(coprocessor="runs/x/final", pause="assets/pause", device="cuda", dtype="bfloat16")
    write_json({"kind": "ppl", ..., "provenance": provenance(wb, t0)}, "runs/ppl.json")
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import augment


class EvalError(ValueError):
    """A usage error of the evaluation commands; the CLI prints the message and exits with 2."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "") -> str:
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine")
    return device


def load_models(decoder: str = "", coprocessor: str = "", pause: str = "", device: str = "", dtype: str = "float32"):
    """A Workbench (decoder, tokenizer, info, coprocessor, pause) on `device` in `dtype`.

    No --coprocessor means the shipped default (or an untrained one, with a notice: Workbench.load).
    """
    from ..checkpoint import load_coprocessor
    from ..workbench import Workbench

    if dtype not in DTYPES:
        raise EvalError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev, dt = resolve_device(device), DTYPES[dtype]
    wb = Workbench.load(decoder or None, coprocessor or None)
    wb.decoder.to(device=dev, dtype=dt)
    wb.coprocessor.to(device=dev, dtype=dt)
    if pause:
        wb.pause = load_coprocessor(pause, wb.decoder, wb.info).to(device=dev, dtype=dt).eval()
        wb.pause_source = str(pause)
        if wb.pause.config.body != "none":
            print(f"note: --pause {pause} has body={wb.pause.config.body!r}, not 'none' (pause tokens)", file=sys.stderr)
    return wb


def git_commit() -> dict:
    """The checkout's commit and whether it has local changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]      # the checkout: cacheaug_core/eval/provenance.py

    def git(*a):
        r = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": None if dirty is None else bool(dirty)}


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _cop_record(cop, source: str) -> dict | None:
    if cop is None:
        return None
    ck = getattr(cop, "checkpoint_config", None) or {}
    return {"source": source, "config": dict(cop.config.__dict__), "status": ck.get("status", ""),
            "training": ck.get("training", {})}


def provenance(wb, t0: float, args=None) -> dict:
    """Everything needed to tell two result files apart: command, code, machine, models, time."""
    import transformers

    dec = wb.decoder
    return {
        "command_line": shlex.join(sys.argv),
        "arguments": {k: v for k, v in vars(args).items() if k != "fn"} if args is not None else None,
        "git": git_commit(),
        "device": device_name(dec.device),
        "dtype": str(augment.decoder_dtype(dec)).replace("torch.", ""),
        "decoder": wb.info.to_dict() if getattr(wb, "info", None) is not None else None,
        "coprocessor": _cop_record(wb.coprocessor, getattr(wb, "coprocessor_source", "")),
        "pause": _cop_record(getattr(wb, "pause", None), getattr(wb, "pause_source", "")),
        "notice": getattr(wb, "notice", ""),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def clean_json(x):
    """NaN/inf -> None and numpy scalars -> Python, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean_json(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(obj: dict, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(clean_json(obj), indent=1, ensure_ascii=False))


def repo_relative(path) -> str:
    """A path inside this checkout written relative to it (tables travel; machines' paths don't)."""
    try:
        return str(Path(str(path)).resolve().relative_to(Path(__file__).resolve().parents[2]))
    except ValueError:
        return str(path)


def provenance_line(prov: dict) -> str:
    """How to reproduce a table: the command, commit and device its JSON records."""
    git = prov.get("git") or {}
    parts = []
    if prov.get("reproduce") or prov.get("command_line"):
        parts.append(f"command: `{prov.get('reproduce') or prov.get('command_line')}`")
    if git.get("commit"):
        parts.append(f"commit {git['commit'][:7]}" + (" (uncommitted changes)" if git.get("dirty") else ""))
    if prov.get("device"):
        parts.append(f"device: {prov['device']}" + (f", {prov['dtype']}" if prov.get("dtype") else ""))
    return ("\n\nReproduce: " + "; ".join(parts) + ".") if parts else ""
