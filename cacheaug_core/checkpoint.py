"""Coprocessor checkpoints: safetensors shards + config.json + a model card, nothing pickled.

A checkpoint folder holds
    config.json                    coprocessor config, decoder id/revision/shape + tokenizer
                                   fingerprint, sha256 of each weights file, training summary,
                                   evaluation tables
    model.safetensors              or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                   (shards of at most 16 MiB), trainable tensors only
    README.md                      the model card

    save_coprocessor(cop, "ckpt/", decoder_info, training={...})
    cop = load_coprocessor("ckpt/", decoder, decoder_info)   # checks it fits this decoder

Writes go to a temporary folder (flushed to disk) that is renamed into place, so a killed process
never leaves a half-written checkpoint; files a caller adds through `extra_files` (the trainer's
state) are part of the same rename. Loading refuses pickled formats (.bin/.pt/.pth/.ckpt) and
reports one clear `CheckpointError` per kind of damage: unreadable files, config.json, another
decoder, weights that do not fit the config, NaN/inf, and (last) bytes that no longer match the
recorded sha256. docs/reliability.md lists the cases and their tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, CoprocessorConfig, from_dict
from .coprocessor import Coprocessor

FORMAT = "cacheaug-coprocessor"
FORMAT_VERSION = 1
SHARD_BYTES = 16 * 1024 * 1024
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message says why and what to do."""


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_interrupted_write(out_dir: str | Path, remove_temps: bool = False) -> bool:
    """Undo what a writer killed inside `atomic_dir_write` left behind. Replacing a folder takes two
    renames (old aside, new in place); killed between them, only `.NAME.old` (complete) is left,
    and it is put back. `remove_temps` also deletes unfinished `.NAME.tmp-*` folders: only for the
    folder's single writer (the trainer), never while another process may be writing it.
    Returns True when the old folder was restored."""
    out = Path(out_dir)
    old = out.parent / f".{out.name}.old"
    restored = False
    if not out.exists() and old.is_dir():
        old.rename(out)
        restored = True
    if remove_temps and out.parent.is_dir():
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    return restored


def atomic_dir_write(out_dir: str | Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to out_dir in one rename (replacing it)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_write(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write(tmp)
        # mkdtemp makes the folder private (0700); a checkpoint is meant to be shared, so it gets the
        # permissions any other new folder and file would get under the user's umask.
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        # Flush before publishing: the rename must never make visible files whose data a crash
        # could still lose.
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(0o666 & ~mask)
                _fsync(f)
        _fsync(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write the tensors as model.safetensors or shards + index; returns {file name: sha256}."""
    shards = _shards(tensors, SHARD_BYTES)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, sh in zip(names, shards):
        save_file(sh, str(tmp / name), metadata={"format": "pt"})
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: n for n, sh in zip(names, shards) for k in sh}}, indent=1))
    return {name: _sha256(tmp / name) for name in names}


def model_card(config: dict) -> str:
    cop, dec = config["coprocessor"], config["decoder"]
    tr = config.get("training") or {}
    lines = [
        "---",
        "library_name: cacheaug",
        "tags: [cache-augmentation, coprocessor, latent-reasoning]",
        "---",
        f"# Coprocessor for `{dec['name']}`",
        "",
        "A coprocessor for differentiable cache augmentation: it reads the frozen decoder's KV cache and",
        f"emits {cop['num_latents']} latent embeddings that the decoder reads before continuing.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for k in ("num_latents", "body", "num_layers", "layer_map", "lora_rank", "rounds", "latent_norm",
              "refeed_last", "latent_pos", "shift_ahead", "hide_point", "latent_gate", "gate_init"):
        lines.append(f"| {k} | {cop.get(k)} |")
    lines += ["", f"Decoder: `{dec['name']}` ({dec['model_type']}, {dec['num_layers']} layers, hidden "
              f"{dec['hidden_size']}), revision `{dec.get('revision', '')}`.", ""]
    if tr:
        lines += ["## Training", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in tr.items() if not isinstance(v, (dict, list))]
        lines.append("")
        made = tr.get("provenance") or {}
        if made:
            commit = (made.get("git") or {}).get("commit") or "unknown"
            lines += [f"Trained by `{made.get('command_line', '')}` at commit `{commit[:12]}` on "
                      f"{made.get('device', '?')} ({made.get('num_processes', 1)} process(es)).", ""]
    if config.get("status"):
        lines += ["## Status", "", config["status"], ""]
    for name, table in (config.get("evaluation") or {}).items():
        lines += [f"## Evaluation: {name}", "", _render_eval(table), ""]
    lines += ["## Use", "", "```bash", "cacheaug generate --coprocessor THIS_FOLDER --prompt \"...\"", "```", ""]
    return "\n".join(lines)


def _render_eval(table) -> str:
    """Markdown for one evaluation entry: text as is, by-position results as a table."""
    if isinstance(table, str):
        return table
    if isinstance(table, dict) and "rel_ppl_change_pct" in table:
        rel = table["rel_ppl_change_pct"]
        head = "| ahead position | " + " | ".join(str(i + 1) for i in range(len(rel))) + " |"
        sep = "|---|" + "---:|" * len(rel)
        row = "| rel. perplexity change | " + " | ".join(f"{x:+.1f}%" for x in rel) + " |"
        return "\n".join([head, sep, row, "", "Negative = the latents lower perplexity (trainer's held-out batches)."])
    return f"```\n{json.dumps(table, indent=1)}\n```"


def save_coprocessor(cop: Coprocessor, out_dir: str | Path, decoder_info, training: dict | None = None,
                     evaluation: dict | None = None, status: str = "", dtype: torch.dtype | None = None,
                     extra: dict | None = None, extra_files=None) -> Path:
    """Write a checkpoint folder atomically. `dtype` casts floating tensors (e.g. bf16 to ship).
    `extra_files(tmp_dir)` may add files (the trainer's state) that appear in the same rename."""
    tensors = {}
    for k, v in cop.trainable_state().items():
        t = v.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "coprocessor": cop.config.__dict__ | {},
        "decoder": decoder_info.to_dict(),
        "training": training or {},
        "evaluation": evaluation or {},
        "status": status,
    } | (extra or {})

    def write(tmp: Path):
        config["weights_sha256"] = _write_weights(tmp, tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "README.md").write_text(model_card(config))
        if extra_files is not None:
            extra_files(tmp)

    return atomic_dir_write(out_dir, write)


def read_config(path: str | Path) -> dict:
    """The checkpoint's config.json, validated; CheckpointError if missing or malformed."""
    p = Path(path)
    if p.is_file():
        if p.suffix in PICKLED:
            raise CheckpointError(f"{p.name}: pickled checkpoints are refused (they can run code when loaded). "
                                  "Save the weights as safetensors with a config.json (cacheaug's save format).")
        raise CheckpointError(f"{p} is a file; a coprocessor checkpoint is a folder with config.json and safetensors")
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint folder at {p}")
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        pickled = [f.name for f in p.iterdir() if f.suffix in PICKLED]
        if pickled:
            raise CheckpointError(f"{p} holds pickled weights ({', '.join(pickled)}), which are refused: they can run "
                                  "code when loaded. Use a safetensors checkpoint saved by cacheaug.")
        raise CheckpointError(f"{p} has no config.json: not a cacheaug coprocessor checkpoint")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a cacheaug coprocessor config (format={config.get('format') if isinstance(config, dict) else None!r})")
    for key in ("coprocessor", "decoder"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{cfg_path} lacks the '{key}' section")
    return config


def _load_tensors(p: Path) -> dict[str, torch.Tensor]:
    index = p / "model.safetensors.index.json"
    files = []
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is damaged: {e}") from e
        files = sorted(set(weight_map.values()))
    elif (p / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickled = [f.name for f in p.iterdir() if f.suffix in PICKLED]
        hint = (f" (found pickled {', '.join(pickled)}, which are refused: they can run code when loaded; "
                "re-save the weights as safetensors with cacheaug)") if pickled else ""
        raise CheckpointError(f"{p} has no model.safetensors{hint}")
    tensors = {}
    for name in files:
        f = p / name
        if not f.exists():
            raise CheckpointError(f"{p}: shard {name} is missing")
        try:
            tensors |= load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f} is truncated or corrupted ({e}); re-download or re-save it") from e
    return tensors


def _verify_digests(p: Path, config: dict) -> None:
    """Corruption that leaves a readable file (flipped bytes in the data) is only visible here.
    Checkpoints saved before checksums were recorded have none and are not checked."""
    recorded = config.get("weights_sha256")
    if not isinstance(recorded, dict):
        return
    for name, digest in sorted(recorded.items()):
        f = p / name
        if f.is_file() and _sha256(f) != digest:
            raise CheckpointError(f"{f} is corrupted: its bytes no longer match the sha256 recorded in config.json "
                                  "when it was saved; re-download or re-save it")


def _check_types(section: dict, where: str) -> None:
    """A value of the wrong type would otherwise fail deep inside validation with a cryptic error."""
    for f in dataclasses.fields(CoprocessorConfig):
        want = type(f.default)
        if f.name not in section or want not in (bool, int, float, str):
            continue
        v = section[f.name]
        if want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif want is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, want)
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[want]
            raise CheckpointError(f"{where}: coprocessor.{f.name} is {v!r}, expected {kind}; "
                                  "config.json is damaged or was edited by hand")


def check_decoder(config: dict, decoder_info) -> None:
    """Raise CheckpointError if the checkpoint was trained for another decoder."""
    want = config["decoder"]
    have = decoder_info.to_dict()
    for k in ("model_type", "hidden_size", "num_layers", "vocab_size", "tokenizer_fingerprint"):
        if want.get(k) and have.get(k) and want[k] != have[k]:
            what = "tokenizer fingerprint" if k == "tokenizer_fingerprint" else k
            raise CheckpointError(
                f"this coprocessor was trained for decoder {want.get('name')!r} ({what} {str(want[k])[:16]}), "
                f"but the loaded decoder {have.get('name')!r} has {what} {str(have[k])[:16]}. "
                "Load the decoder it was trained for, or train a coprocessor for this one.")


def load_coprocessor(path: str | Path, decoder, decoder_info, check: bool = True) -> Coprocessor:
    """Build the coprocessor for `decoder` and load a checkpoint's weights into it."""
    p = Path(path)
    config = read_config(p)
    if check:
        check_decoder(config, decoder_info)
    _check_types(config["coprocessor"], f"{p}/config.json")
    try:
        cfg = from_dict(CoprocessorConfig, config["coprocessor"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{p}/config.json: invalid coprocessor settings: {e}") from e
    tensors = _load_tensors(p)
    cop = Coprocessor(cfg, decoder)
    want = cop.trainable_state()
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: the weights do not match config.json (body={cfg.body}, num_latents="
            f"{cfg.num_latents}, num_layers={cfg.num_layers}): missing tensors {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected tensors {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''}; config.json and the weights come from different "
            "coprocessors, or the weights were edited")
    for k, t in tensors.items():
        if k == "soft_tokens" and t.dim() == want[k].dim() and tuple(t.shape[1:]) == tuple(want[k].shape[1:]) \
                and t.shape[0] != want[k].shape[0]:
            raise CheckpointError(f"{p}: config.json says num_latents={cfg.num_latents}, but the weights hold "
                                  f"{t.shape[0]} soft tokens; config.json and the weights come from different "
                                  "checkpoints")
        if tuple(t.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{p}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(want[k].shape)} "
                                  "(wrong num_latents or a checkpoint for another decoder)")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{p}: tensor {k} holds NaN or inf values; the checkpoint is unusable")
    _verify_digests(p, config)
    with torch.no_grad():
        for k, param in want.items():
            param.copy_(tensors[k].to(param.dtype))
    cop.eval()
    cop.checkpoint_config = config
    return cop


def _check_export_target(src: Path, dst: Path) -> None:
    """Writing `dst` replaces the whole folder, so refuse any `dst` whose loss would be the user's
    data: a file, a folder that is not a checkpoint, a training checkpoint (its trainer state would
    be lost), the source itself, a folder holding the source or the working directory. An empty
    folder or an earlier export may be replaced."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise CheckpointError(f"export: the destination {dst} is the source checkpoint; choose another folder")
    if d in s.parents or d in Path.cwd().resolve().parents or d == Path.cwd().resolve():
        raise CheckpointError(f"export: the destination {dst} holds the source checkpoint or the working directory "
                              "and would be replaced; choose a new folder")
    if d.is_file():
        raise CheckpointError(f"export: the destination {dst} is a file; give a folder name")
    if d.is_dir() and any(d.iterdir()):
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            cfg = None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise CheckpointError(f"export: the destination {dst} exists and is not a cacheaug checkpoint folder; "
                                  "it would be replaced, so choose a new folder")
        if (d / "trainer_state.json").exists():
            raise CheckpointError(f"export: the destination {dst} is a training checkpoint (it holds the trainer "
                                  "state to resume from); choose a new folder")


def export_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype | None = torch.bfloat16,
                      status: str | None = None, evaluation: dict | None = None) -> Path:
    """Copy a checkpoint's weights, config and card (not the trainer state) to `dst`, casting
    floating tensors to `dtype` (bf16 halves a training checkpoint for shipping). No decoder needed."""
    src = Path(src)
    config = read_config(src)
    _check_export_target(src, Path(dst))
    _verify_digests(src, config)          # never give corrupted weights a fresh checksum
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in _load_tensors(src).items()}
    if status is not None:
        config["status"] = status
    if evaluation:
        config["evaluation"] = (config.get("evaluation") or {}) | evaluation
    config["weights_dtype"] = str(dtype).replace("torch.", "") if dtype is not None else "as trained"

    def write(tmp: Path):
        config["weights_sha256"] = _write_weights(tmp, tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "README.md").write_text(model_card(config))

    return atomic_dir_write(dst, write)


def checkpoint_size_mib(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20
