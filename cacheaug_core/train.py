"""Train a coprocessor on a frozen decoder: one-pass multi-point training on `accelerate`.

    cacheaug train --data data/corpus --out-dir runs/c16 --num-latents 16 --steps 2000
    cacheaug train --data notes.txt --steps 200 --max-minutes 2          # a text file works too
    cacheaug train --out-dir runs/c16 --resume                           # continue a killed run
    cacheaug train --out-dir runs/c16 --resume --steps 4000              # ... and extend it
    accelerate launch --config_file configs/accelerate/ddp.yaml -m cacheaug_core.cli train ...  # GPUs

Under `accelerate launch` (DDP, or FSDP version 2) each process draws its own data stream
(`data_seed`) and gradients are averaged across processes; only the main process writes, and a
checkpoint always holds whole tensors, so a run resumes on any number of processes (docs/multigpu.md).

The loop, top to bottom: schedule -> micro-batches (random windows, P random augmentation points
each, loss on the ahead tokens only) with gradient accumulation -> clip -> step -> log ->
periodic held-out evaluation by ahead position -> checkpoint. `accelerate` handles device,
precision and distribution; the decoder is frozen and never wrapped.

`out_dir/last/` is always a complete checkpoint: coprocessor weights + `trainer_state.safetensors`
(optimizer moments, RNG states) + `trainer_state.json` (step, schedule, data position), all
written in one temporary folder that is renamed into place, so `--resume` continues bit-exactly
from the last save of a killed run. A resumed run keeps its saved settings (`resume_settings`): the
data, sequence length, batch and points cannot change; a new run never overwrites another's `last/`.
A NaN/inf loss or gradient, or a failed write (a full disk),
stops with `TrainingError` and leaves the last good checkpoint untouched.
`out_dir/metrics.jsonl` gets one line per log/eval event (loss, gradient norm, learning rate, tokens
seen, elapsed seconds, original tokens per second over this run and over its last RECENT_STEPS).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import augment, fastpath, kv, masks
from .checkpoint import (load_coprocessor, read_config, recover_interrupted_write,
                         save_coprocessor)
from .config import CoprocessorConfig, TrainConfig, from_dict, to_dict
from .cudagraph import CapturedStep
from .coprocessor import Coprocessor
from .decoder import load_decoder
from .heldout import check_training_path
from .sources import MONITOR_SET


class TrainingError(RuntimeError):
    """Training stopped; the last good checkpoint is kept. The message says why."""


# The progress bar's tokens/s and metrics.jsonl's `tokens_per_s_recent` are taken over this many
# of the latest steps (fewer at the start of a run); `tokens_per_s` over the whole run.
RECENT_STEPS = 20


# ---------------------------------------------------------------------------------------------
# Data: a prepared corpus folder or a plain text file.


class TextData:
    """Random windows from one tokenised text file; the last 5% of tokens are held out."""

    def __init__(self, path: str | Path, tokenizer, split: str = "train"):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text, add_special_tokens=False) if hasattr(tokenizer, "encode") else tokenizer(text)
        if len(ids) < 2:   # the training split would be empty and sampling would fail far from here
            raise TrainingError(f"--data {path}: the file holds {len(ids)} token(s) of text; give a text file "
                                "with some content or a folder made by `cacheaug prepare-data`")
        ids = torch.tensor(ids, dtype=torch.long)
        cut = int(len(ids) * 0.95)
        self.tokens = ids[:cut] if split == "train" else ids[cut:]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        n = len(self.tokens)
        if n < seq_len:
            reps = math.ceil(seq_len / max(n, 1)) + 1
            self.tokens = self.tokens.repeat(reps)
            n = len(self.tokens)
        starts = torch.randint(0, n - seq_len + 1, (batch_size,), generator=generator)
        return torch.stack([self.tokens[s: s + seq_len] for s in starts.tolist()])


class PackData:
    """A training pack: pre-drawn windows from a corpus as flat uint16 files (`train_*.bin`) plus a
    held-out stream (`heldout.bin`), made by `scripts/gpu_pack.py` to travel to a GPU machine in
    pieces. Random windows are drawn over all train files present, so a run resumed after more
    pieces arrived sees them too."""

    def __init__(self, path: Path, split: str):
        import numpy as np

        files = sorted(path.glob("train_*.bin")) if split == "train" else [path / "heldout.bin"]
        arrays = [np.memmap(f, dtype=np.uint16, mode="r") for f in files if f.exists()]
        if not arrays:
            raise TrainingError(f"{path}: no {'train_*.bin' if split == 'train' else 'heldout.bin'} files")
        self.tokens = torch.from_numpy(np.concatenate(arrays).astype(np.int64))

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - seq_len + 1, (batch_size,), generator=generator)
        return torch.stack([self.tokens[s: s + seq_len] for s in starts.tolist()])


def open_data(path: str, tokenizer, split: str):
    p = Path(path)
    if p.is_dir() and (p / "pack.json").exists():
        return PackData(p, split)
    if p.is_dir():
        from .data import TokenData

        return TokenData(p, split="train" if split == "train" else MONITOR_SET)
    if p.is_file():
        check_training_path(p)
        return TextData(p, tokenizer, split)
    raise TrainingError(f"--data {path!r}: no such file or folder (use a text file or run `cacheaug prepare-data`)")


def check_data_tokenizer(data, tokenizer, vocab_size: int, path: str) -> None:
    """Refuse token data built for another tokenizer: its ids would index the wrong embeddings (or
    past the last one). A prepared corpus records its tokenizer's fingerprint and vocabulary size;
    a pack records neither, so its ids are checked against the decoder's vocabulary."""
    hint = "; prepare the data again with this decoder's tokenizer, or train with the decoder it was built for"
    manifest = getattr(data, "manifest", None)
    if manifest is not None:
        from .data import DataError, _backend

        want = manifest.get("tokenizer") or {}
        if want.get("vocab_size") and int(want["vocab_size"]) > vocab_size:
            raise TrainingError(f"--data {path} was built with a tokenizer of {want['vocab_size']} tokens, but the "
                                f"decoder has {vocab_size}{hint}")
        if want.get("fingerprint") and hasattr(tokenizer, "backend_tokenizer"):
            try:
                have = _backend(tokenizer)[2]
            except DataError:   # a tokenizer the corpus builder could not have used either
                have = None
            if have is not None and have != want["fingerprint"]:
                raise TrainingError(f"--data {path} was built with another tokenizer ({want.get('name')}, "
                                    f"fingerprint {want['fingerprint']}) than the decoder's ({have}){hint}")
    elif isinstance(data, PackData) and data.num_tokens and int(data.tokens.max()) >= vocab_size:
        raise TrainingError(f"--data {path} holds token id {int(data.tokens.max())}, but the decoder's vocabulary "
                            f"has {vocab_size} tokens{hint}")


# A resumed run continues the data stream and schedule it saved: these settings shape the stream,
# so a resume that changes them is refused rather than silently training on something else.
RESUME_FIXED = ("data", "seq_len", "batch_size", "grad_accum", "points", "n_ahead", "seed")


def saved_train_config(out_dir: str | Path) -> dict | None:
    """The train settings saved with out_dir's last checkpoint (also from `.last.old`, left by a run
    killed between the two renames of a save); None when there are none."""
    out = Path(out_dir)
    for folder in (out / "last", out / ".last.old"):
        try:
            saved = json.loads((folder / "trainer_state.json").read_text()).get("train_config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(saved, dict):
            return saved
    return None


def _same(name: str, a, b) -> bool:
    if name in ("data", "decoder") and a and b:  # the same file through another relative path
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def resume_settings(saved: dict, explicit: dict) -> tuple[dict, list[str]]:
    """The settings of a resumed run: the saved ones, with the options the user set explicitly
    (flags, YAML) applied where they may change. Returns (values, notices); TrainingError when an
    explicit value changes one of RESUME_FIXED."""
    # stop_after counts the steps of one invocation: a resume gets its own, not the killed one's
    own = ("resume", "out_dir", "init_from", "stop_after")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in names and k not in own}
    notices = []
    for k, v in explicit.items():
        if k in own or k not in values or _same(k, v, values[k]):
            continue
        if k in RESUME_FIXED:
            raise TrainingError(f"--resume: this run was trained with --{k.replace('_', '-')} {values[k]}, not {v}; "
                                "changing it would change the data stream mid-run. Drop the flag, or start a new "
                                "run in another --out-dir")
        notices.append(f"--{k.replace('_', '-')} {v} replaces the run's {values[k]}"
                       + (" (the learning-rate schedule follows the new value)" if k in ("steps", "warmup", "lr",
                                                                                         "min_lr_ratio") else ""))
        values[k] = v
    return values, notices


def data_seed(seed: int, rank: int) -> int:
    """Seed of process `rank`'s data stream (its windows and augmentation points).

    Rank 0 draws from `seed` itself, so a single-process run sees exactly the batches it always has;
    every other rank gets a stream of its own, so the processes of a distributed run train on
    different batches. A checkpoint keeps every rank's stream position (see `train`).
    """
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"cacheaug-data/{seed}/{rank}".encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------
# Optimizer state and RNG, saved as safetensors + JSON (never pickled).


def _optimizer_to_safetensors(sd: dict) -> tuple[dict, dict]:
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_from_safetensors(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


# Several processes: DDP replicates the coprocessor, FSDP (version 2) shards it; the frozen decoder
# is never wrapped. Checkpoints hold whole tensors in the single-process layout either way, so a
# run saved on any number of processes resumes on any other, DDP or FSDP.


def _is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


class _Whole:
    """What `save_coprocessor` reads from a coprocessor (config, trainable tensors), with the
    tensors gathered whole from whatever wrapper trains it."""

    def __init__(self, config: CoprocessorConfig, tensors: dict[str, torch.Tensor]):
        self.config, self._tensors = config, tensors

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self._tensors


def _fsdp_unscalar(cop) -> set[str]:
    """fully_shard cannot shard 0-dim parameters (the latent gain): give each a dimension of one,
    which broadcasts the same, before the optimizer is built. Returns their names; checkpoints
    keep them 0-dim (`_trainable_tensors`, `_optimizer_state`, `_load_optimizer_state`)."""
    names = {n for n, p in cop.named_parameters() if p.dim() == 0}
    for n in names:
        owner, _, attr = n.rpartition(".")
        mod, p = cop.get_submodule(owner), cop.get_parameter(n)
        setattr(mod, attr, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
    return names


def _trainable_tensors(acc, model, scalars: set[str]) -> dict[str, torch.Tensor]:
    """The coprocessor's trainable tensors, whole. Under FSDP every process must call this (the
    shards are gathered) and only the main process gets them."""
    if not _is_fsdp(acc):
        return acc.unwrap_model(model).trainable_state()
    full = acc.get_state_dict(model)
    if not acc.is_main_process:
        return {}
    return {n: full[n].reshape(()) if n in scalars else full[n] for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_state(acc, model, opt, scalars: set[str]) -> dict:
    """The optimizer's state_dict in the plain layout (parameters numbered in param-group order,
    whole tensors). Under FSDP every process must call this and only the main process gets it."""
    if not _is_fsdp(acc):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, opt.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not acc.is_main_process:
        return {}
    # FSDP keys parameters by their name in the model; the plain layout numbers them in group order
    index = {n: i for i, n in enumerate(n for g in full["param_groups"] for n in g["params"])}
    state = {index[n]: {k: v.reshape(()) if n in scalars and torch.is_tensor(v) else v for k, v in st.items()}
             for n, st in full["state"].items()}
    return {"state": state,
            "param_groups": [g | {"params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def _load_optimizer_state(acc, model, opt, sd: dict, scalars: set[str]) -> None:
    """Load a plain-layout optimizer state_dict; under FSDP each process keeps its own shard."""
    if not _is_fsdp(acc):
        opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name = {id(p): n for n, p in model.named_parameters()}
    names = [name[id(p)] for g in opt.optimizer.param_groups for p in g["params"]]
    state = {names[i]: {k: v.reshape(1) if names[i] in scalars and k != "step" else v for k, v in st.items()}
             for i, st in sd["state"].items()}
    full = {"state": state,
            "param_groups": [g | {"params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, opt.optimizer, full, options=StateDictOptions(full_state_dict=True))


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def param_groups(cop: Coprocessor, cfg: TrainConfig) -> list[dict]:
    """Soft tokens and the latent projection learn faster than the pretrained body."""
    fast, body = [], []
    for n, p in cop.named_parameters():
        if not p.requires_grad:
            continue
        (body if n.startswith("body.") else fast).append(p)
    groups = [{"params": fast, "lr": cfg.lr * cfg.soft_lr_mult, "weight_decay": 0.0}]
    if body:
        groups.append({"params": body, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    return groups


# ---------------------------------------------------------------------------------------------
# Held-out evaluation by ahead position.


@torch.no_grad()
def evaluate_heldout(decoder, cop, batches: list[torch.Tensor], points: list[torch.Tensor], n_ahead: int,
                     base_cache: dict | None = None) -> dict:
    """Mean NLL by ahead position for the decoder alone and with the coprocessor, on fixed batches."""
    was_training = cop.training
    cop.eval()
    aug_sum = torch.zeros(n_ahead)
    base_sum = torch.zeros(n_ahead)
    count = torch.zeros(n_ahead)
    for ids, pts in zip(batches, points):
        cache, logits = augment.prefill(decoder, ids)
        base = augment.plain_nll(logits, ids)                                   # (B, T)
        _, nll = augment.multi_point_loss(decoder, cop, ids, pts, n_ahead, cache=kv.detach(cache))
        idx = pts[..., None] + torch.arange(1, n_ahead + 1, device=pts.device)  # (B, P, A)
        valid = ~torch.isnan(nll)
        b = torch.gather(base, 1, idx.clamp(max=ids.shape[1] - 1).flatten(1)).view_as(idx)
        aug_sum += torch.where(valid, nll, 0).sum((0, 1)).float().cpu()
        base_sum += torch.where(valid, b, 0).sum((0, 1)).float().cpu()
        count += valid.sum((0, 1)).float().cpu()
    if was_training:
        cop.train()
    aug, base = (aug_sum / count).tolist(), (base_sum / count).tolist()
    rel = [100 * (math.exp(a - b) - 1) for a, b in zip(aug, base)]
    # The key keeps its historical name; with n_ahead < 16 it is the mean over positions
    # 1..n_ahead, which `mean_rel_positions` records (and the progress line prints).
    return {"nll_aug": aug, "nll_base": base, "rel_ppl_change_pct": rel,
            "mean_rel_1_16": sum(rel[:16]) / len(rel[:16]), "mean_rel_positions": len(rel[:16])}


# ---------------------------------------------------------------------------------------------
# The loop.


def _trainer_state(step, tokens_seen, streams, opt_state, sched, cfg, elapsed) -> tuple[dict, dict]:
    tensors, meta = _optimizer_to_safetensors(opt_state)
    for rank, st in sorted(streams.items()):  # rank 0 keeps the single-process name
        tensors["rng.data" if rank == 0 else f"rng.data.{rank}"] = st
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta |= {"step": step, "tokens_seen": tokens_seen, "scheduler": sched.state_dict(), "elapsed_s": elapsed,
             "train_config": to_dict(cfg)}
    return tensors, meta


def _accelerator(cfg: TrainConfig):
    """The run's Accelerator. accelerate keeps its settings once per process, so a process that
    trains twice (a notebook, a test session) with another --precision would be refused, and one
    with another --device would silently keep the first device. Outside a distributed launch
    (one process, no WORLD_SIZE) its state is reset first: each train() call gets its own."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if "WORLD_SIZE" not in os.environ and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state()
        PartialState._reset_state()
    return Accelerator(mixed_precision=cfg.precision, cpu=(cfg.device == "cpu"))


def _made_by(acc) -> dict:
    """What a checkpoint records about the run that wrote it: command, code, machine, versions."""
    import platform
    import shlex
    import sys

    import transformers

    from .eval.provenance import device_name, git_commit

    return {"command_line": shlex.join(sys.argv), "git": git_commit(), "device": device_name(acc.device),
            "num_processes": acc.num_processes,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def train(cfg: TrainConfig, cop_cfg: CoprocessorConfig, show_progress: bool = True) -> Path:
    """Run training; returns the folder of the final checkpoint (out_dir/last)."""
    from tqdm.auto import tqdm

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {cfg.device}: CUDA is not available on this machine")
    acc = _accelerator(cfg)
    made_by = _made_by(acc)
    if _is_fsdp(acc) and acc.state.fsdp_plugin.fsdp_version != 2:
        raise TrainingError("FSDP needs fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)")
    out = Path(cfg.out_dir)
    last = out / "last"
    state_meta, state_tensors = None, None
    if acc.is_main_process:
        recover_interrupted_write(last, remove_temps=True)   # a run killed while saving
    acc.wait_for_everyone()  # the other processes read `last` only once it is whole again
    if not cfg.resume and last.exists():
        raise TrainingError(f"{out} already holds a checkpoint ({last}); use --resume to continue it or "
                            "another --out-dir")
    if cfg.resume:
        if not (last / "trainer_state.json").exists():
            raise TrainingError(f"--resume: no resumable checkpoint at {last}")
        try:
            state_meta = json.loads((last / "trainer_state.json").read_text())
            state_tensors = load_file(str(last / "trainer_state.safetensors"))
        except (OSError, ValueError, SafetensorError) as e:
            raise TrainingError(f"--resume: the trainer state in {last} is unreadable ({e})") from e
        # the data stream continues only with the settings that drew it (the CLI fills them in)
        for k, v in (state_meta.get("train_config") or {}).items():
            if k in RESUME_FIXED and not _same(k, getattr(cfg, k), v):
                raise TrainingError(f"--resume: this run was trained with {k}={v!r}, not {getattr(cfg, k)!r}; "
                                    "changing it would change the data stream mid-run. Start a new run in "
                                    "another --out-dir")
        # the run's own coprocessor settings win over flags
        saved = read_config(last)
        cop_cfg = from_dict(CoprocessorConfig, saved["coprocessor"])

    if not cfg.data:   # checked after --resume's checkpoint: a resumed run takes its data from there
        raise TrainingError("--data is required: a text file or a folder made by `cacheaug prepare-data`")

    # The frozen decoder is stored in the compute precision (no master copy needed: it never updates).
    dec_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    decoder, tok, info = load_decoder(cfg.decoder or None, device=acc.device, dtype=dec_dtype)
    pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    train_data = open_data(cfg.data, tok, "train")
    heldout = open_data(cfg.data, tok, "heldout")
    check_data_tokenizer(train_data, tok, info.vocab_size, cfg.data)

    if cfg.resume:
        cop = load_coprocessor(last, decoder, info)
    elif cfg.init_from:
        cop = load_coprocessor(cfg.init_from, decoder, info)
        cop_cfg = cop.config
    else:
        cop = Coprocessor(cop_cfg, decoder)
    if cfg.fast and (why := fastpath.unsupported(decoder, cop, acc.device, training=True)):
        raise TrainingError(f"--fast: {why}; train without --fast")
    if cfg.fast:   # an --mlp that cannot run says so before the first step, not inside it
        try:   # the MLPs compute in the decoder's dtype (its compute precision, above)
            fastpath.resolve_mlp(cfg.mlp, acc.device, fastpath.blocks(decoder)[0], dec_dtype)
        except ValueError as e:
            raise TrainingError(f"--mlp {cfg.mlp}: {e}; use --mlp auto or compiled") from e
    if cfg.cuda_graph and (why := _no_graph(acc, cfg)):
        raise TrainingError(f"--cuda-graph: {why}; train without --cuda-graph")
    cop.float().train()
    scalars = _fsdp_unscalar(cop) if _is_fsdp(acc) else set()
    # The fused AdamW: one kernel for all parameters instead of a few per tensor group, and it
    # skips a non-finite step by itself (see the loop). FSDP keeps the default: its parameters are
    # sharded DTensors.
    fused = not _is_fsdp(acc)
    opt = torch.optim.AdamW(param_groups(cop, cfg), betas=(0.9, 0.95), eps=1e-8, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    rank = acc.process_index
    gen = torch.Generator().manual_seed(data_seed(cfg.seed, rank))
    idle_streams: dict[int, torch.Tensor] = {}
    step, tokens_seen, elapsed0 = 0, 0, 0.0
    if cfg.resume:
        sched.load_state_dict(state_meta["scheduler"])
        # Each rank continues its own saved stream; a rank the saved run did not have starts its
        # stream from the beginning; streams of saved ranks this run lacks are kept untouched for a
        # later resume on more processes.
        streams = {0 if k == "rng.data" else int(k.rsplit(".", 1)[1]): v for k, v in state_tensors.items()
                   if k == "rng.data" or k.startswith("rng.data.")}
        if rank in streams:
            gen.set_state(streams[rank])
        idle_streams = {r: st for r, st in streams.items() if r >= acc.num_processes}
        torch.set_rng_state(state_tensors["rng.torch"])
        if "rng.cuda" in state_tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_tensors["rng.cuda"])
        step, tokens_seen = state_meta["step"], state_meta["tokens_seen"]
        elapsed0 = state_meta.get("elapsed_s", 0.0)
    if cfg.fast and (cfg.compile or acc.device.type == "cuda"):
        # uncompiled FlexAttention is a slow reference implementation: on a GPU --fast compiles
        fastpath.enable_compile()
    elif cfg.compile:
        augment.compile_layers(decoder)
        if cop.body is not None:
            augment.compile_layers(cop.body)
    model, opt = acc.prepare(cop, opt)
    if cfg.resume:  # after prepare: under FSDP the moments are sharded like the weights
        _load_optimizer_state(acc, model, opt, _optimizer_from_safetensors(state_tensors, state_meta), scalars)

    # Fixed held-out batches (their own generator, so evaluation never moves the data stream).
    eg = torch.Generator().manual_seed(10_000 + cfg.seed)
    eval_batches, eval_points = [], []
    if cfg.eval_every > 0 and heldout.num_tokens > cfg.seq_len:
        for _ in range(cfg.eval_batches):
            eval_batches.append(heldout.sample(cfg.batch_size, cfg.seq_len, eg).to(acc.device))
            eval_points.append(masks.sample_points(cfg.seq_len, cfg.points, cfg.batch_size, eg).to(acc.device))

    out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "a")

    def log(rec):
        if acc.is_main_process:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    def save(tag: str = "last", final_eval: dict | None = None):
        from accelerate.utils import gather_object

        # Every process takes part in gathering (all ranks' data streams; under FSDP also the
        # sharded weights and optimizer moments); only the main process writes.
        weights = _trainable_tensors(acc, model, scalars)
        opt_state = _optimizer_state(acc, model, opt, scalars)
        streams = dict(enumerate(gather_object([gen.get_state()]))) | idle_streams
        if not acc.is_main_process:
            return
        unwrapped = _Whole(acc.unwrap_model(model).config, weights)
        tensors, meta = _trainer_state(step, tokens_seen, streams, opt_state, sched, cfg, elapsed0 + time.time() - t0)
        meta["num_processes"] = acc.num_processes
        training = {"steps": step, "tokens_seen": tokens_seen, "data": cfg.data, "seq_len": cfg.seq_len,
                    "points": cfg.points, "n_ahead": cfg.n_ahead, "batch_size": cfg.batch_size * cfg.grad_accum
                    * acc.num_processes, "lr": cfg.lr, "precision": cfg.precision,
                    "train_config": to_dict(cfg), "provenance": made_by}
        evaluation = {"heldout_by_position": final_eval} if final_eval else {}
        if not all(torch.isfinite(v).all() for v in unwrapped.trainable_state().values()):
            raise stop(f"the weights hold NaN or inf at step {step}; stopped without saving. The last good "
                                f"checkpoint is kept in {out / tag}. Lower --lr or use --precision no.")

        def write_state(tmp: Path):  # inside the checkpoint's own temporary folder: one atomic rename
            save_file(tensors, str(tmp / "trainer_state.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=str))

        try:
            save_coprocessor(unwrapped, out / tag, info, training=training, evaluation=evaluation,
                             extra_files=write_state)
        except OSError as e:
            raise stop(f"could not write checkpoint to {out / tag} ({e}); the last good checkpoint is "
                                "kept. Free disk space and run again with --resume.") from e

    t0 = time.time()
    start_step, tokens0 = step, tokens_seen
    recent = collections.deque([(t0, tokens0)], maxlen=RECENT_STEPS)   # (time, tokens_seen): run start, settled steps
    # compiled blocks (and a captured graph) make the first step take minutes on a GPU: the bar says
    # so until it is done, where a user would otherwise see a bar that does not move
    compiling = cfg.compile or (cfg.fast and acc.device.type == "cuda")
    bar = tqdm(total=cfg.steps, initial=step, disable=not (show_progress and acc.is_main_process),
               desc="train (compiling the first step)" if compiling else "train")

    def stop(msg: str) -> TrainingError:
        bar.close()  # the error is then printed on a line of its own, not after the progress bar
        return TrainingError(msg)

    last_eval = None
    # A step's loss and gradient norm reach the host while the next step runs (`_StepNumbers`):
    # with a fused AdamW in one process the optimizer skips a non-finite step on its own
    # (`found_inf`), so the host need not wait for the GPU before stepping; it checks a step
    # after queueing the next one, and the GPU never idles while the host prepares a step.
    # Otherwise (several processes, a loss scaler, other optimizers) each step is checked before
    # it is taken.
    defer = _defers(acc, opt)
    pending = None   # a step taken but not yet checked and reported: (step, tokens_seen, lr, numbers)

    def check(at: int, numbers) -> tuple[float, float]:
        """A step's loss and gradient norm as floats; stop on NaN/inf (at: the step's number, 1-based)."""
        loss_acc, gnorm_f = numbers.values()
        if not math.isfinite(loss_acc):
            raise stop(f"loss became {loss_acc} at step {at - 1}; stopped. The last good checkpoint "
                       f"is kept in {last}. Lower --lr or use --precision no.")
        if not math.isfinite(gnorm_f):  # a finite loss can still have NaN/inf gradients; never step on them
            raise stop(f"the gradient norm became {gnorm_f} at step {at - 1}; stopped. The last good "
                       f"checkpoint is kept in {last}. Lower --lr or use --precision no.")
        return loss_acc, gnorm_f

    def settle(rec):
        """Check a taken step (stop on NaN/inf), then report it: progress bar, metrics.jsonl."""
        at, seen, lr, numbers = rec
        loss_acc, gnorm_f = check(at, numbers)
        if compiling and at == start_step + 1:
            bar.set_description("train", refresh=False)
        bar.update(1)
        now = time.time()
        # original tokens per second (all processes) over this run's steps, and over the last
        # RECENT_STEPS: the first steps include compilation on a GPU (minutes with --fast), which
        # the whole-run rate carries for a long time; the progress bar shows the recent one
        rate = (seen - tokens0) / max(now - t0, 1e-9)
        t_old, seen_old = recent[0]
        rate_recent = (seen - seen_old) / max(now - t_old, 1e-9)
        recent.append((now, seen))
        bar.set_postfix(loss=f"{loss_acc:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate_recent:,.0f}")
        if at % cfg.log_every == 0 or at == 1:
            if acc.num_processes > 1:  # the mean over ranks: the loss whose gradient the ranks share
                loss_acc = acc.reduce(torch.tensor(loss_acc, device=acc.device), "mean").item()
            log({"step": at, "loss": loss_acc, "grad_norm": gnorm_f, "lr": lr,
                 "tokens_seen": seen, "elapsed_s": round(elapsed0 + now - t0, 2),
                 "tokens_per_s": round(rate, 1), "tokens_per_s_recent": round(rate_recent, 1)})

    captured = None   # --cuda-graph: the step's forward and backward, captured at the first step

    def fast_loss(ids, pts):
        """The fast path's loss of one micro-batch (captured as a graph with --cuda-graph)."""
        with acc.autocast():
            return fastpath.multi_point_loss(decoder, model, ids, pts, cfg.n_ahead, pad_id=pad_id, mlp=cfg.mlp)

    while step < cfg.steps:
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=acc.device)
        for micro in range(cfg.grad_accum):
            ids = _to_device(train_data.sample(cfg.batch_size, cfg.seq_len, gen), acc.device)
            pts = _to_device(masks.sample_points(cfg.seq_len, cfg.points, cfg.batch_size, gen), acc.device)
            if cfg.cuda_graph:   # one micro-batch (checked): the replay leaves the gradients in p.grad
                if captured is None:
                    captured = CapturedStep(fast_loss, model.parameters(), ids, pts)
                loss_sum += captured(ids, pts).detach().float()
                tokens_seen += ids.numel()
                continue
            if cfg.fast:
                loss = fast_loss(ids, pts)
            else:
                with acc.autocast():
                    cache = augment.prefill_cache(decoder, ids)
                    loss, _ = augment.multi_point_loss(decoder, model, ids, pts, cfg.n_ahead, cache=cache,
                                                       pad_id=pad_id)
            sync = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(model) if not sync and acc.num_processes > 1 else _null()
            with ctx:
                acc.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach().float() / cfg.grad_accum
            tokens_seen += ids.numel() * acc.num_processes
        if pending is not None:   # the previous step, checked while this one runs on the GPU
            settle(pending)
            pending = None
        gnorm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        # The loss and the gradient norm go to the host together, in one transfer. Checked before
        # the step, that is the step's one wait for the GPU (every process sees the same
        # all-reduced norm); deferred, the optimizer skips a non-finite step by itself.
        numbers = _StepNumbers(loss_sum, gnorm)
        if defer:
            getattr(opt, "optimizer", opt).found_inf = numbers.bad
        else:
            check(step + 1, numbers)
        opt.step()
        sched.step()
        step += 1
        pending = (step, tokens_seen, sched.get_last_lr()[-1], numbers)
        if not defer:   # checked already: reported at once
            settle(pending)
            pending = None
        now = time.time()
        timed_out = cfg.max_minutes > 0 and (now - t0) / 60 >= cfg.max_minutes
        if cfg.max_minutes > 0 and acc.num_processes > 1:
            # each process reads its own clock: all stop at the same step, or the rest would wait
            # forever in the next step's all-reduce
            timed_out = acc.reduce(torch.tensor(float(timed_out), device=acc.device), "sum").item() > 0
        done = step >= cfg.steps or timed_out or (cfg.stop_after > 0 and step - start_step >= cfg.stop_after)
        evaluating = bool(eval_batches) and (step % cfg.eval_every == 0 or done)
        saving = step % cfg.save_every == 0 or done
        if pending is not None and (evaluating or saving):   # nothing is evaluated or saved unchecked
            settle(pending)
            pending = None
        if evaluating:
            last_eval = evaluate_heldout(decoder, acc.unwrap_model(model), eval_batches, eval_points, cfg.n_ahead)
            log({"step": step, "eval": last_eval})
            if acc.is_main_process:
                bar.write(f"step {step}: held-out rel. ppl change pos1 {last_eval['rel_ppl_change_pct'][0]:+.2f}% "
                          f"mean1-{last_eval['mean_rel_positions']} {last_eval['mean_rel_1_16']:+.2f}%")
        if saving:
            save("last", last_eval)
        if done:
            break
    bar.close()
    metrics.close()
    acc.wait_for_everyone()
    return last


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on the training device; to a GPU through pinned memory without waiting (a
    plain copy would wait for the kernels queued before it, e.g. the previous micro-batch's)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _StepNumbers:
    """A step's loss and gradient norm (scalar tensors; sharded ones whole) on their way to the
    host in one transfer. On a GPU the copy goes to pinned memory without waiting; `values()`
    waits for this step's kernels only, not for those queued after it. `bad` () is 1.0 on the
    device where either is NaN or inf: a fused optimizer's `found_inf`, which skips the update."""

    def __init__(self, loss: torch.Tensor, gnorm: torch.Tensor):
        whole = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in (loss, gnorm)]
        dev = whole[0].device
        vals = torch.stack([t.detach().float().reshape(()).to(dev) for t in whole])   # (2,)
        self.bad = (~torch.isfinite(vals).all()).float()
        self.event, self._values = None, None
        if vals.is_cuda:
            self.host = torch.empty(2, pin_memory=True)
            self.host.copy_(vals, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = vals

    def values(self) -> list[float]:
        if self._values is None:
            if self.event is not None:
                self.event.synchronize()
            self._values = self.host.tolist()
        return self._values


def _no_graph(acc, cfg) -> str | None:
    """Why this run cannot replay its steps as a CUDA graph, or None."""
    if acc.device.type != "cuda":
        return f"CUDA graphs need a GPU (this run is on {acc.device.type})"
    if acc.num_processes > 1:
        return "one process only (the gradients' all-reduce runs outside a captured step)"
    if cfg.precision == "fp16":
        return "fp16's loss scaler changes the backward between steps; use --precision bf16"
    return None


def _defers(acc, opt) -> bool:
    """Whether a step may be taken before its numbers reach the host: one process (several must
    stop together), and a fused AdamW that honours `found_inf` with no loss scaler of its own
    (fp16's GradScaler sets found_inf itself)."""
    inner = getattr(opt, "optimizer", opt)
    return (acc.num_processes == 1 and getattr(acc, "scaler", None) is None
            and isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and bool(inner.defaults.get("fused")))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
