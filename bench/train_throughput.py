"""Training throughput: the dense path and the fast path side by side, in one run, on one GPU.

    python bench/train_throughput.py --out results/train_throughput.json            # GPU
    python bench/train_throughput.py --tiny --steps 2 --out /tmp/tp.json             # CPU smoke test
    python bench/train_throughput.py --shapes ref --paths fast --profile /tmp/prof.txt   # where time goes
    python bench/train_throughput.py --shapes ref --paths dense,fast,fast@128             # path@B: batch B
    python bench/train_throughput.py --decoder-config path/to/decoder --shapes ref --paths dense,fast@32   # another decoder

The decoder is SmolLM2-135M-shaped with random weights (throughput depends on shapes, not on the
weights, so nothing needs to be staged), or shaped as `--decoder-config` says (a Llama- or
Qwen2-style decoder's folder or config.json: what a bigger decoder would do), the coprocessor a
full copy. For each shape the paths
run the same number of optimizer steps on the same batches:

  dense          `augment.multi_point_loss` through transformers: SDPA with the dense float group
                 mask, full-precision logits for every predicted position
  dense+compile  the same with every transformer block compiled (`augment.compile_layers`)
  fast           `fastpath.multi_point_loss`: plain per-layer K/V, FlexAttention with the group
                 BlockMask (64 x 64 blocks on an H100; key blocks nobody sees are skipped; groups
                 padded to tile the blocks), fused chunked LM head + cross-entropy, one compiled
                 block function for all layers (on CPU: dense masks, uncompiled)
  fast-nopad     the same without padding the groups
  fast-kvsplit   the fast path with k and v projected by two matmuls instead of one
  fast-fullrows  the fast path with every row through the coprocessor's and the group pass's last
                 layer (before, the rows read only as keys and values there were made too)
  fast-cublasmlp the fast path with the decoder's MLP compiled (cuBLAS + inductor) where it would
                 otherwise run through quack's fused SwiGLU GEMMs (fastpath.resolve_mlp)
  fast-quack     the fast path with the decoder's MLP through quack's GEMMs, or an error saying why not
  fast-quackall  the fast path with the coprocessor's trained MLP through quack's GEMMs as well
                 (fastpath._TrainedSwiGLU; weight gradients as cuBLAS matmuls)
  fast-prefixgrads  the fast path with FlexAttention computing key/value gradients for the frozen
                 prefix keys too (what it did before `masks.without_prefix_key_grads`)
  fast-untuned   the fast path with FlexAttention's default kernel configurations
  fast-before    both: the fast path as it was before these two changes
  fast-b<Q>[x<K>]  the fast path with BlockMask blocks of Q queries x K keys (fast-b128: the blocks before the 64 x 64 default)
  fast-tma       the fast path with FlexAttention loading its tiles through TMA (Hopper)
  fast-<opts>    the fast path with other FlexAttention kernel options (FAST_VARIANTS below)
  <path>+graph   a fast path with its forward and backward replayed as one CUDA graph
                 (`CapturedStep`; the optimizer step stays outside it)

The paths of a shape take their timed steps in turns (`--order interleaved`, the default): all
are warmed up (compiled) first, then each round times one step of every path, the order rotated
each round, so that an H100 whose speed drifts within a process (identical paths run one after
the other measured up to 14% apart) drifts for all of them alike. They share one decoder,
coprocessor and optimizer (a step's time does not depend on the weights), except dense+compile,
which compiles its modules in place. Peak memory is the largest of the path's own steps.

`--autotune flex` lets inductor benchmark FlexAttention's kernel configurations when it compiles
(max_autotune with ATen-only matmuls, so the matmuls are not tuned); `--autotune all` tunes the
matmuls too (Triton templates, with their epilogues fused). Run each as its own process.

Reported per run: original (text) tokens per second, a counted-FLOP model (matmul FLOPs of the
useful work: decoder prefill forward, coprocessor forward+backward, decoder group pass forward +
input-gradient backward, LM head; masked-out attention, key/value gradients of the frozen prefix
and recomputation are not counted; `counted_flops`) and the
fraction of the GPU's bf16 dense peak it implies, peak memory, and the speed-up over the dense
path (at its default batch, and at its best batch of the run: `speedup_over_best_dense`).
Before timing, the two paths' losses and coprocessor gradients are compared on one batch.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cacheaug_core import augment, fastpath, masks  # noqa: E402
from cacheaug_core.config import CoprocessorConfig  # noqa: E402
from cacheaug_core.coprocessor import Coprocessor  # noqa: E402
from cacheaug_core.cudagraph import CapturedStep  # noqa: E402
from cacheaug_core.decoder import freeze  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def smollm2_config(tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


COUNTED_MODEL_TYPES = ("llama", "qwen2")   # the configs whose terms counted_flops knows


def decoder_config(path: str = "", tiny: bool = False):
    """The decoder shape to measure: SmolLM2-135M's (a tiny one with `tiny`), or the config of
    another decoder, `path` a transformers folder or its config.json (weights are random either
    way: the throughput depends on the shapes, not the weights). Llama- and Qwen2-style configs:
    the counted-FLOP model's terms."""
    if not path:
        return smollm2_config(tiny)
    from transformers import AutoConfig

    if not Path(path).exists():
        raise ValueError(f"--decoder-config: no such folder or file: {path}")
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in COUNTED_MODEL_TYPES:
        raise ValueError(f"--decoder-config: the counted-FLOP model covers {', '.join(COUNTED_MODEL_TYPES)} "
                         f"configs, not {cfg.model_type!r}")
    return cfg


def counted_flops(cfg, B, T, P, NL, A) -> dict:
    """Useful matmul FLOPs of one training step (see the module docstring).

    Attention counts (query, key) pairs that the mask allows, attn_q FLOPs each for a forward
    (Q K^T and P V). Backward: the query gradient over every allowed pair (dO V^T and dS K, the
    same FLOPs as the forward), and key/value gradients only for the keys that take a gradient:
    the appended rows' own (groups', soft tokens'), not the frozen prefix the decoder cached.

    The last decoder layer's outputs count only where a loss reads them: the prefill's last layer
    counts its key/value projection alone (the coprocessor and the groups read its cache, nothing
    reads its hidden states), and in the group pass's last layer the rows before the A that predict
    the ahead tokens (all latents but the last) count their key/value projection alone."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    qd, kvd = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd    # d, d/3 for SmolLM2-135M
    layer = 2 * d * qd + 2 * d * kvd + 3 * d * cfg.intermediate_size        # params in one layer's linears
    lin, kv_only = L * layer, 2 * d * kvd
    attn_q = 4 * cfg.num_attention_heads * hd                                # FLOPs per (query, key) and layer
    G = NL + A - 1
    U = G - A                                                                 # rows whose last-layer output no loss reads
    avg_p = (T - 2) / 2                                                       # mean point position
    # the linears' matmuls (LM head included) per sequence
    linear = {"prefill": 2 * (lin - layer + kv_only) * T,
              "coprocessor": 3 * 2 * (lin + d * d) * P * NL,                    # + its output projection;
                                                                                # weights' gradients too
              "group": 2 * 2 * (lin * P * G - (layer - kv_only) * P * U),       # input gradient only
              "head": 2 * (2 * d * V * P * A)}
    # attention: allowed (query, key) pairs
    cop_prefix, cop_own = P * NL * (avg_p + 1), P * NL * (NL + 1) / 2
    grp_prefix, grp_own = P * G * (avg_p + 1), P * G * (G + 1) / 2
    u_prefix, u_own = P * U * (avg_p + 1), P * U * (U + 1) / 2               # the U rows' pairs
    attention = {"prefill": (L - 1) * attn_q * T * (T + 1) / 2,
                 "coprocessor": L * attn_q * (2 * (cop_prefix + cop_own) + cop_own),
                 "group": (L * attn_q * (2 * (grp_prefix + grp_own) + grp_own)
                           - attn_q * 2 * (u_prefix + u_own)),                  # last layer: the U rows' queries
                 "head": 0.0}
    per_seq = {k: linear[k] + attention[k] for k in linear}
    return {"per_step": B * sum(per_seq.values()), "per_seq": per_seq, "linear_per_seq": linear}


def make_models(cfg, attn: str, device, dtype, state=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dec = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).to(device)
    if state is not None:
        dec.load_state_dict(state)
    return freeze(dec)


FAST_VARIANTS = {
    "fast": {},
    "fast-nopad": {"align": 1},
    "fast-kvsplit": {"fuse_kv": False},   # k and v as two matmuls (as before fastpath._qkv fused them)
    "fast-fullrows": {"trim_last": False},  # every row through the appended passes' last layer (as before)
    "fast-cublasmlp": {"mlp": "compiled"},  # the decoder's MLP compiled (cuBLAS + inductor), not quack's fused GEMMs
    "fast-quack": {"mlp": "quack"},         # the decoder's MLP through quack (an error where it cannot run)
    "fast-quackall": {"mlp": "quack-all"},  # the coprocessor's (trained) MLP through quack too
    "fast-prefixgrads": {"frozen": False},
    # the BlockMask's blocks (query x key; the default on an H100 is 64 x 64: fastpath.BLOCK)
    "fast-b128": {"block": 128},
    "fast-b64": {"block": 64},
    "fast-b64x128": {"block": (64, 128)},
    "fast-b128x64": {"block": (128, 64)},
    "fast-b32x64": {"block": (32, 64)},
    # the default tiles with FlexAttention's TMA loads (Hopper's bulk copies; off by default on CUDA)
    "fast-tma": {"kernel_options": {**fastpath.fit_kernel_options(fastpath.TUNED_KERNEL_OPTIONS, fastpath.BLOCK),
                                    "USE_TMA": True}},
    # the variants below were measured with 128 x 128 blocks, and keep them
    "fast-untuned": {"kernel_options": None, "block": 128},
    "fast-before": {"frozen": False, "kernel_options": None, "block": 128},
    "fast-safe": {"kernel_options": {"ROWS_GUARANTEED_SAFE": True}, "block": 128},  # every row sees its own key
    "fast-bwd64": {"block": 128, "kernel_options": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                                    "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3}},
    "fast-bwdm2": {"block": 128, "kernel_options": {"bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 4}},
    "fast-fwd8": {"block": 128, "kernel_options": {"fwd_num_warps": 8, "fwd_num_stages": 2}},
    "fast-fwd64": {"block": 128, "kernel_options": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_warps": 4}},
    "fast-fwd128x64": {"block": 128, "kernel_options": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4}},
    # what `--autotune flex` picked on an H100 at the reference shape with 128 x 128 blocks (both
    # passes, forward and backward); since made the default there (fastpath.TUNED_KERNEL_OPTIONS)
    "fast-tuned": {"block": 128, "kernel_options": {
        "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
        "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
        "bwd_num_warps": 4, "bwd_num_stages": 3}},
}


def step_loss(dec, cop, ids, pts, A, fast: bool | dict):
    """fast: False (dense path), True (fast path, defaults) or keyword arguments of the fast path."""
    dev = ids.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        if fast is not False:
            return fastpath.multi_point_loss(dec, cop, ids, pts, A, **({} if fast is True else fast))
        cache = augment.prefill_cache(dec, ids)
        return augment.multi_point_loss(dec, cop, ids, pts, A, cache=cache)[0]


def new_models(cfg, dev, dtype, NL: int):
    """(decoder, full-copy coprocessor with NL latents, its optimizer) for one or more paths."""
    dec = make_models(cfg, "sdpa", dev, dtype)
    cop = Coprocessor(CoprocessorConfig(num_latents=NL), dec).float()
    return dec, cop, torch.optim.AdamW(cop.parameters(), lr=1e-5, fused=dev.type == "cuda")


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class PathRun:
    """One path of one shape: its models, optimizer and batches, and what its steps measured."""
    name: str
    fast: bool | dict
    dec: torch.nn.Module
    cop: torch.nn.Module
    opt: torch.optim.Optimizer
    batches: list
    pts: list
    A: int
    times: list = field(default_factory=list)
    peaks: list = field(default_factory=list)
    host: list = field(default_factory=list)   # per timed step: host time to queue it (s)
    first: float | None = None
    loss: float | None = None
    steps_done: int = 0
    error: str | None = None
    graph: bool = False          # the step's forward and backward replayed as one CUDA graph
    captured: object = None      # its CapturedStep, made on the first step

    def step(self, chain: int = 1) -> tuple[float, float]:
        """`chain` optimizer steps queued back to back and synchronised once at the end: their wall
        time per step and the host's time per step to queue them (s); the peak memory is kept.
        With chain 1 each step starts from an idle GPU and includes the host's time to queue its
        first kernels; with more, the host queues a
        step while the GPU runs the one before, as in a training loop that does not wait for
        every step's loss (`cacheaug train` on a GPU: train.py)."""
        dev = self.batches[0].device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(chain):
            i = self.steps_done
            ids, pts = self.batches[i % len(self.batches)], self.pts[i % len(self.pts)]
            if self.graph:
                if self.captured is None:  # warms up on a side stream and captures: a warmup step's work
                    self.captured = CapturedStep(
                        lambda i, p: step_loss(self.dec, self.cop, i, p, self.A, self.fast), self.cop.parameters(), ids, pts)
                loss = self.captured(ids, pts)
            else:
                loss = step_loss(self.dec, self.cop, ids, pts, self.A, self.fast)
                loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.steps_done += 1
        queued = time.perf_counter() - t0   # the host's time to queue the steps (near t: host-bound)
        _sync(dev)
        t = (time.perf_counter() - t0) / chain
        if dev.type == "cuda":
            self.peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        self.first = t if self.first is None else self.first
        self.loss = float(loss.detach())
        return t, queued / chain

    def profile(self, out: str) -> None:
        """Append a torch.profiler table of one step to `out`."""
        from torch.profiler import ProfilerActivity, profile as prof

        dev = self.batches[0].device
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        if self.graph and self.captured is None:
            # capture first (sequential paths free their graph after timing): the profile is then
            # of one replay, not of the two warm-up steps and the capture it would hold three times over
            self.step()
        with prof(activities=acts) as p:
            self.step()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        table = p.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90)
        with open(out, "a") as f:
            f.write(f"==== {self.name}\n" + table + "\n")
        if dev.type == "cuda":
            # every GPU kernel of the step (the table above lists the top 60 rows only)
            from torch.autograd import DeviceType
            rows = [(e.key, e.count, e.self_device_time_total) for e in p.key_averages()
                    if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
            with open(out + f".{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}.kernels.csv", "w") as f:
                f.write("kernel,calls,self_us\n")
                for name, n, us in sorted(rows, key=lambda r: -r[2]):
                    f.write(f'"{name}",{n},{us:.1f}\n')


def run_paths(runs: list[PathRun], steps: int, warmup: int, interleave: bool, chain: int = 1) -> None:
    """Time `steps` samples of every path after `warmup` steps (the first compiles), each sample
    `chain` steps queued back to back (`PathRun.step`). Interleaved:
    warm every path up, then take one timed step of each path per round, the paths' order rotated
    each round, so that a GPU whose speed drifts during the run (clocks, temperature) drifts
    for all paths alike; otherwise each path's steps run back to back."""
    def guarded(run, timed):
        try:
            t, queued = run.step(chain if timed else 1)
            if timed:
                run.times.append(t)
                run.host.append(queued)
        except torch.OutOfMemoryError as e:
            run.error = "out of memory: " + str(e)[:200]
        except Exception as e:  # keep measuring the other paths
            run.error = repr(e)[:500]

    if not interleave:
        for run in runs:
            for i in range(warmup + steps):
                if run.error is None:
                    guarded(run, i >= warmup)
            # a captured graph keeps its step's memory in a pool of its own: free it for the next path
            run.captured = None
            run.opt.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return
    for run in runs:
        for _ in range(warmup):
            if run.error is None:
                guarded(run, False)
    for r in range(steps):
        for run in runs[r % len(runs):] + runs[:r % len(runs)]:
            if run.error is None:
                guarded(run, True)


def parity(cfg, dev, dtype, T, P, NL, A, variants=("fast",), **cop_kw):
    """Loss and coprocessor gradients of both paths on one batch (bf16 autocast on GPU, batch 2);
    fast-path variants other than "fast" are compared with the dense path and with "fast"."""
    dec = make_models(cfg, "sdpa", dev, dtype)
    cop = Coprocessor(CoprocessorConfig(num_latents=NL, **cop_kw), dec).float()
    with torch.no_grad():  # move off the identity/zero init so every gradient is exercised
        for p in cop.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=g).to(dev)
    pts = masks.sample_points(T, P, 2, g).to(dev)
    out = {}
    names = ["dense", "fast"] + [v for v in variants if v != "fast"]
    for name in names:
        cop.zero_grad(set_to_none=True)
        loss = step_loss(dec, cop, ids, pts, A, FAST_VARIANTS.get(name, False))
        loss.backward()
        out[name] = (float(loss), torch.cat([p.grad.flatten().float() for p in cop.parameters() if p.grad is not None]))
    gd, gf = out["dense"][1], out["fast"][1]
    cos = float(torch.nn.functional.cosine_similarity(gd, gf, dim=0))
    res = {"coprocessor": cop_kw or "full copy", "loss_dense": out["dense"][0], "loss_fast": out["fast"][0],
           "grad_cosine": cos, "grad_rel_err": float((gd - gf).norm() / gd.norm())}
    for name in names[2:]:
        g = out[name][1]
        res[name] = {"loss": out[name][0], "grad_cosine": float(torch.nn.functional.cosine_similarity(gd, g, dim=0)),
                     "grad_rel_err": float((gd - g).norm() / gd.norm()),
                     "grad_rel_diff_vs_fast": float((g - gf).norm() / gf.norm()),
                     "loss_diff_vs_fast": out[name][0] - out["fast"][0]}
    return res


def save(result: dict, out: str, partial: dict | None = None) -> None:
    """Write the results so far (a run cut short by a time limit still leaves its finished rows)."""
    doc = dict(result, runs=result["runs"] + ([partial] if partial is not None else []))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/train_throughput.json")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chain", type=int, default=1,
                    help="steps per timed sample, queued back to back with one wait at the end (1: every "
                         "step waited for, starting from an idle GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke test)")
    ap.add_argument("--decoder-config", default="",
                    help="measure this decoder's shape instead of SmolLM2-135M's: a transformers folder or its "
                         "config.json (Llama/Qwen2-style; random weights)")
    ap.add_argument("--shapes", default="ref,paper,nl32,nl64", help="which shapes to run")
    ap.add_argument("--paths", default="dense,dense+compile,fast", help="which paths to run")
    ap.add_argument("--batch", type=int, default=0, help="batch size for every shape (0: each shape's default)")
    ap.add_argument("--no-parity", dest="parity", action="store_false", help="skip the loss/gradient comparison")
    ap.add_argument("--profile", default="", help="append a torch.profiler table of one step per path to this file")
    ap.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                    help="timed steps of the paths taken in turns (default) or each path's back to back")
    ap.add_argument("--autotune", choices=("none", "flex", "all"), default="none",
                    help="inductor benchmarks kernel configurations when it compiles: FlexAttention's only "
                         "(matmuls stay ATen), or the matmuls' too")
    args = ap.parse_args(argv)
    if args.autotune != "none":
        import torch._inductor.config as ind

        ind.max_autotune = True
        if args.autotune == "flex":
            ind.max_autotune_gemm_backends = "ATEN"
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        cfg = decoder_config(args.decoder_config, args.tiny)
    except ValueError as e:
        ap.error(str(e))
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    # (name, T, P, NL, A, batch)
    shapes = {"ref": ("reference: T=512, 16 points, 16 latents, 16 ahead", 512, 16, 16, 16, 64),
              "paper": ("paper: T=2048, 128 points, 16 latents, 16 ahead", 2048, 128, 16, 16, 4),
              "nl32": ("T=512, 16 points, 32 latents", 512, 16, 32, 16, 48),
              "nl64": ("T=512, 16 points, 64 latents", 512, 16, 64, 16, 32)}
    if args.tiny:
        shapes = {k: (v[0], 64, 4, 4, 4, 2) for k, v in shapes.items() if k == "ref"}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"device": gpu, "torch": torch.__version__, "commit": commit, "bf16_peak_flops": peak,
              "command": " ".join(["python"] + sys.argv), "autotune": args.autotune, "order": args.order,
              "chain": args.chain, "decoder_config": args.decoder_config or "SmolLM2-135M",
              "runs": []}
    T0, P0, NL0, A0 = (512, 16, 16, 16) if not args.tiny else (64, 4, 4, 4)
    if "fast" in args.paths and dev.type == "cuda":
        fastpath.enable_compile()
    for key in args.shapes.split(","):
        if key not in shapes:
            continue
        label, T, P, NL, A, B0 = shapes[key]
        B0 = args.batch or B0
        row = {"shape": label, "T": T, "points": P, "num_latents": NL, "n_ahead": A, "batch": B0,
               "flops_breakdown_per_seq": counted_flops(cfg, 1, T, P, NL, A)["per_seq"]}
        runs, shared = [], None
        for name in args.paths.split(","):
            # "path@B": this path at batch B (the fast path fits larger batches than the dense one)
            path, _, b = name.partition("@")
            B = int(b) if b else B0
            graph = path.endswith("+graph") and dev.type == "cuda"
            path = path.removesuffix("+graph")
            g = torch.Generator().manual_seed(0)  # the same batches for every path at this batch size
            batches = [torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(dev) for _ in range(2)]
            pts = [masks.sample_points(T, P, B, g).to(dev) for _ in range(2)]
            if path == "dense+compile":  # compiles its modules in place: models of its own
                models = new_models(cfg, dev, dtype, NL)
                augment.compile_layers(models[0])
                augment.compile_layers(models[1].body)
            else:  # the step's time does not depend on the weights: the other paths share them
                models = shared = shared or new_models(cfg, dev, dtype, NL)
            runs.append(PathRun(name, FAST_VARIANTS.get(path, False), *models, batches, pts, A, graph=graph))
        run_paths(runs, args.steps, args.warmup, args.order == "interleaved", args.chain)
        for run in runs:
            B = run.batches[0].shape[0]
            if run.error is None and args.profile:
                run.profile(args.profile)
            if run.error is not None or not run.times:
                row[run.name] = {"batch": B, "error": run.error or "no timed step"}
            else:
                fl = counted_flops(cfg, B, T, P, NL, A)
                t = sorted(run.times)[len(run.times) // 2]
                row[run.name] = {"batch": B, "step_s": t, "step_s_all": run.times, "first_step_s": run.first,
                                 "orig_tokens_per_s": B * T / t,
                                 "host_queue_s": sorted(run.host)[len(run.host) // 2],
                                 "peak_mem_gib": max(run.peaks) if run.peaks else None, "loss": run.loss,
                                 "counted_flops_per_step": fl["per_step"], "flops_per_s": fl["per_step"] / t,
                                 "frac_bf16_peak": None if peak is None else fl["per_step"] / t / peak}
            print(key, run.name, row[run.name], flush=True)
        runs = shared = models = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save(result, args.out, partial=row)
        timed = [k for k in args.paths.split(",") if "orig_tokens_per_s" in row.get(k, {})]
        base = row.get("dense", {}).get("orig_tokens_per_s")
        if base:
            row["speedup_over_dense"] = {k: row[k]["orig_tokens_per_s"] / base for k in timed}
        # the dense path at its best batch of this run ("dense", "dense@B"; not dense+compile):
        # the fair comparator when the dense path was run at several batch sizes
        dense = [k for k in timed if k.partition("@")[0] == "dense"]
        if dense:
            best = max(dense, key=lambda k: row[k]["orig_tokens_per_s"])
            row["best_dense"] = best
            row["speedup_over_best_dense"] = {k: row[k]["orig_tokens_per_s"] / row[best]["orig_tokens_per_s"]
                                              for k in timed}
        result["runs"].append(row)
    if args.parity:
        result["parity"] = []  # after the timings: its small shapes compile the fast path once more
        for kw in ({}, {"num_layers": 8 if not args.tiny else 1, "refeed_last": True, "hide_point": True,
                        "shift_ahead": False, "latent_gate": True, "gate_init": -1.0}):
            try:
                variants = [p.partition("@")[0].removesuffix("+graph") for p in args.paths.split(",")]
                variants = [v for v in dict.fromkeys(variants) if v in FAST_VARIANTS]
                result["parity"].append(parity(cfg, dev, dtype, T0, P0, NL0, A0, variants, **kw))
            except Exception as e:  # keep measuring even if one path fails
                result["parity"].append({"coprocessor": kw or "full copy", "error": repr(e)[:500]})
            print("parity", result["parity"][-1], flush=True)
    save(result, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
