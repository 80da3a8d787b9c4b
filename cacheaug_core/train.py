"""Train a coprocessor on a frozen decoder: one-pass multi-point training on `accelerate`.

    cacheaug train --data data/corpus --out-dir runs/c16 --num-latents 16 --steps 2000
    cacheaug train --data notes.txt --steps 200 --max-minutes 2          # a text file works too
    cacheaug train --out-dir runs/c16 --resume                           # continue a killed run
    accelerate launch -m cacheaug_core.cli train ...                     # several GPUs

The loop, top to bottom: schedule -> micro-batches (random windows, P random augmentation points
each, loss on the ahead tokens only) with gradient accumulation -> clip -> step -> log ->
periodic held-out evaluation by ahead position -> checkpoint. `accelerate` handles device,
precision and distribution; the decoder is frozen and never wrapped.

`out_dir/last/` is always a complete checkpoint (written atomically): coprocessor weights +
`trainer_state.safetensors` (optimizer moments, RNG states) + `trainer_state.json` (step,
schedule, data position), so `--resume` continues exactly where a killed run stopped.
`out_dir/metrics.jsonl` gets one line per log/eval event.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import augment, kv, masks
from .checkpoint import CheckpointError, atomic_dir_write, load_coprocessor, read_config, save_coprocessor
from .config import CoprocessorConfig, TrainConfig, from_dict, to_dict
from .coprocessor import Coprocessor
from .decoder import load_decoder


class TrainingError(RuntimeError):
    """Training stopped; the last good checkpoint is kept. The message says why."""


# ---------------------------------------------------------------------------------------------
# Data: a prepared corpus folder or a plain text file.


class TextData:
    """Random windows from one tokenised text file; the last 5% of tokens are held out."""

    def __init__(self, path: str | Path, tokenizer, split: str = "train"):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text, add_special_tokens=False) if hasattr(tokenizer, "encode") else tokenizer(text)
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

        return TokenData(p, split="train" if split == "train" else "indist")
    if p.is_file():
        return TextData(p, tokenizer, split)
    raise TrainingError(f"--data {path!r}: no such file or folder (use a text file or run `cacheaug prepare-data`)")


# ---------------------------------------------------------------------------------------------
# Optimizer state and RNG, saved as safetensors + JSON (never pickled).


def _optimizer_to_safetensors(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_from_safetensors(opt, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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
    return {"nll_aug": aug, "nll_base": base, "rel_ppl_change_pct": rel,
            "mean_rel_1_16": sum(rel[:16]) / len(rel[:16])}


# ---------------------------------------------------------------------------------------------
# The loop.


def _trainer_state(step, tokens_seen, gen, opt, sched, cfg, elapsed) -> tuple[dict, dict]:
    tensors, meta = _optimizer_to_safetensors(opt)
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta |= {"step": step, "tokens_seen": tokens_seen, "scheduler": sched.state_dict(), "elapsed_s": elapsed,
             "train_config": to_dict(cfg)}
    return tensors, meta


def train(cfg: TrainConfig, cop_cfg: CoprocessorConfig, show_progress: bool = True) -> Path:
    """Run training; returns the folder of the final checkpoint (out_dir/last)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    acc = Accelerator(mixed_precision=cfg.precision, cpu=(cfg.device == "cpu"))
    out = Path(cfg.out_dir)
    last = out / "last"
    state_meta, state_tensors = None, None
    if cfg.resume:
        if not (last / "trainer_state.json").exists():
            raise TrainingError(f"--resume: no resumable checkpoint at {last}")
        state_meta = json.loads((last / "trainer_state.json").read_text())
        state_tensors = load_file(str(last / "trainer_state.safetensors"))
        # the run's own settings win over flags for everything that shapes the data stream
        saved = read_config(last)
        cop_cfg = from_dict(CoprocessorConfig, saved["coprocessor"])

    # The frozen decoder is stored in the compute precision (no master copy needed: it never updates).
    dec_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    decoder, tok, info = load_decoder(cfg.decoder or None, device=acc.device, dtype=dec_dtype,
                                      attn_implementation="flex_attention" if cfg.fast else None)
    pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    train_data = open_data(cfg.data, tok, "train")
    heldout = open_data(cfg.data, tok, "heldout")

    if cfg.resume:
        cop = load_coprocessor(last, decoder, info)
    elif cfg.init_from:
        cop = load_coprocessor(cfg.init_from, decoder, info)
        cop_cfg = cop.config
    else:
        cop = Coprocessor(cop_cfg, decoder)
    cop.float().train()
    opt = torch.optim.AdamW(param_groups(cop, cfg), betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, tokens_seen, elapsed0 = 0, 0, 0.0
    if cfg.resume:
        _optimizer_from_safetensors(opt, state_tensors, state_meta)
        sched.load_state_dict(state_meta["scheduler"])
        gen.set_state(state_tensors["rng.data"])
        torch.set_rng_state(state_tensors["rng.torch"])
        if "rng.cuda" in state_tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_tensors["rng.cuda"])
        step, tokens_seen = state_meta["step"], state_meta["tokens_seen"]
        elapsed0 = state_meta.get("elapsed_s", 0.0)
    if cfg.compile:
        augment.compile_layers(decoder)
        if cop.body is not None:
            augment.compile_layers(cop.body)
    model, opt = acc.prepare(cop, opt)

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
        if not acc.is_main_process:
            return
        unwrapped = acc.unwrap_model(model)
        tensors, meta = _trainer_state(step, tokens_seen, gen, opt, sched, cfg, elapsed0 + time.time() - t0)
        training = {"steps": step, "tokens_seen": tokens_seen, "data": cfg.data, "seq_len": cfg.seq_len,
                    "points": cfg.points, "n_ahead": cfg.n_ahead, "batch_size": cfg.batch_size * cfg.grad_accum
                    * acc.num_processes, "lr": cfg.lr, "precision": cfg.precision,
                    "train_config": to_dict(cfg)}
        evaluation = {"heldout_by_position": final_eval} if final_eval else {}
        try:
            path = save_coprocessor(unwrapped, out / tag, info, training=training, evaluation=evaluation)
            save_file(tensors, str(path / "trainer_state.safetensors"))
            (path / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=str))
        except OSError as e:
            raise TrainingError(f"could not write checkpoint to {out / tag} ({e}); the last good checkpoint is "
                                "kept. Free disk space and run again with --resume.") from e

    t0 = time.time()
    start_step = step
    bar = tqdm(total=cfg.steps, initial=step, disable=not (show_progress and acc.is_main_process), desc="train")
    last_eval = None
    while step < cfg.steps:
        opt.zero_grad(set_to_none=True)
        loss_acc = 0.0
        for micro in range(cfg.grad_accum):
            ids = train_data.sample(cfg.batch_size, cfg.seq_len, gen).to(acc.device)
            pts = masks.sample_points(cfg.seq_len, cfg.points, cfg.batch_size, gen).to(acc.device)
            with acc.autocast():
                cache = augment.prefill_cache(decoder, ids)
                loss, _ = augment.multi_point_loss(decoder, model, ids, pts, cfg.n_ahead, cache=cache,
                                                   pad_id=pad_id, chunked=cfg.fast)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step}; stopped. The last good checkpoint "
                                    f"is kept in {last}. Lower --lr or use --precision no.")
            sync = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(model) if not sync and acc.num_processes > 1 else _null()
            with ctx:
                acc.backward(loss / cfg.grad_accum)
            loss_acc += loss.item() / cfg.grad_accum
            tokens_seen += ids.numel() * acc.num_processes
        gnorm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_acc:.3f}", lr=f"{sched.get_last_lr()[-1]:.1e}")
        if step % cfg.log_every == 0 or step == 1:
            log({"step": step, "loss": loss_acc, "grad_norm": float(gnorm), "lr": sched.get_last_lr()[-1],
                 "tokens_seen": tokens_seen, "elapsed_s": round(elapsed0 + time.time() - t0, 2)})
        done = (step >= cfg.steps or (cfg.max_minutes > 0 and (time.time() - t0) / 60 >= cfg.max_minutes)
                or (cfg.stop_after > 0 and step - start_step >= cfg.stop_after))
        if eval_batches and (step % cfg.eval_every == 0 or done):
            last_eval = evaluate_heldout(decoder, acc.unwrap_model(model), eval_batches, eval_points, cfg.n_ahead)
            log({"step": step, "eval": last_eval})
            bar.write(f"step {step}: held-out rel. ppl change pos1 {last_eval['rel_ppl_change_pct'][0]:+.2f}% "
                      f"mean1-16 {last_eval['mean_rel_1_16']:+.2f}%")
        if step % cfg.save_every == 0 or done:
            save("last", last_eval)
        if done:
            break
    bar.close()
    metrics.close()
    acc.wait_for_everyone()
    return last


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
