"""Configuration dataclasses: the coprocessor, training and evaluation.

Every field carries its help text in `metadata["help"]`; the CLI builds its flags from these
(`--num-latents 16`, `--lr 2e-4`, ...) and a YAML file may set any of them (`--config run.yaml`,
flags win). `__post_init__` validates and names the offending flag. The resolved config is saved
with every checkpoint and every results file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BODIES = ("copy", "lora", "scratch", "none")
MLP_KERNELS = ("auto", "compiled", "quack", "quack-all")   # the fast path's MLP kernels (fastpath.resolve_mlp)
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow", "all", "none")   # --report-to (accelerate's trackers)


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the flag."""


@dataclass
class CoprocessorConfig:
    """The coprocessor: soft tokens through a trainable body that reads the decoder's cache.

    Args:
        num_latents: latents produced per augmentation point (the paper's N_L).
        body: "copy" (trainable copy of the decoder, paper default), "lora" (LoRA on a frozen copy),
            "scratch" (same architecture, random init), "none" (pause tokens: soft tokens go
            straight into the decoder, no coprocessor).
        num_layers: layers in the body; 0 = as many as the decoder. Fewer gives a compact coprocessor.
        layer_map: which decoder layers' K/V the body's layers read when it has fewer layers:
            "first" (layers 0..k-1) or "spread" (evenly spaced, first and last included).
        lora_rank / lora_alpha: LoRA size and scale (body="lora").
        rounds: deliberation rounds; each extra round re-runs the soft tokens attending to the
            previous round's latents before the decoder reads the result.
        latent_norm: "embed_rms" rescales each latent to the decoder's mean input-embedding RMS
            (times a learned gain), "none" leaves the body's output scale.
        refeed_last / latent_pos / shift_ahead: where latents and the text after them sit (see
            `masks.GroupLayout`); inference uses the same layout as training.
        hide_point: with refeed_last, the group no longer sees the point token's own cache entry:
            the re-fed copy stands in for it. With shift_ahead off this makes the group compute
            exactly what the plain decoder computes whenever it ignores the latents.
        latent_gate / gate_init: a learned bias, one per decoder layer, added to the decoder's
            attention scores on latent keys, starting at gate_init. A negative start hides the
            latents at first, so training starts from the plain decoder's predictions and opens
            the gate only where the latents help (with hide_point and no shift, the augmented
            decoder starts equal to the decoder at every ahead position).
    """

    num_latents: int = _f(16, "latents per augmentation point (N_L)")
    body: str = _f("copy", "coprocessor body: copy | lora | scratch | none (pause tokens)")
    num_layers: int = _f(0, "layers in the body (0 = all decoder layers; fewer = compact)")
    layer_map: str = _f("first", "decoder layers a shallower body reads: first | spread")
    lora_rank: int = _f(64, "LoRA rank (body=lora)")
    lora_alpha: float = _f(128.0, "LoRA alpha (body=lora)")
    rounds: int = _f(1, "deliberation rounds (1 = the paper; more re-run soft tokens on the previous latents)")
    latent_norm: str = _f("embed_rms", "latent scale: embed_rms (match input embeddings) | none")
    refeed_last: bool = _f(False, "re-feed the point's token after the latents")
    latent_pos: str = _f("continue", "latent position ids: continue (p+1..p+N_L) | shared (all p+1)")
    shift_ahead: bool = _f(True, "shift positions after the latents by their span")
    hide_point: bool = _f(False, "with refeed_last: the group sees the re-fed point token, not its original entry")
    latent_gate: bool = _f(False, "learned per-layer bias on the decoder's attention scores to latents")
    gate_init: float = _f(-4.0, "starting value of the latent gate bias (negative = latents start hidden)")
    init_seed: int = _f(0, "seed for soft-token and scratch initialisation")

    def __post_init__(self):
        if self.num_latents < 1:
            raise ConfigError(f"--num-latents must be >= 1, got {self.num_latents}")
        if self.body not in BODIES:
            raise ConfigError(f"--body must be one of {BODIES}, got {self.body!r}")
        if self.num_layers < 0:
            raise ConfigError(f"--num-layers must be >= 0, got {self.num_layers}")
        if self.layer_map not in ("first", "spread"):
            raise ConfigError(f"--layer-map must be first or spread, got {self.layer_map!r}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.latent_norm not in ("embed_rms", "none"):
            raise ConfigError(f"--latent-norm must be embed_rms or none, got {self.latent_norm!r}")
        if self.latent_pos not in ("continue", "shared"):
            raise ConfigError(f"--latent-pos must be continue or shared, got {self.latent_pos!r}")
        if self.hide_point and not self.refeed_last:
            raise ConfigError("--hide-point needs --refeed-last (otherwise the point token is lost)")
        if self.body == "lora" and self.lora_rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1, got {self.lora_rank}")


@dataclass
class TrainConfig:
    """One-pass multi-point training of a coprocessor on a frozen decoder."""

    decoder: str = _f("", "decoder: empty = embedded SmolLM2-135M-Instruct, a local folder, or a Hub id")
    data: str = _f("", "training data: a corpus folder (cacheaug prepare-data / tokenize), a text, jsonl/json, "
                       "parquet or csv file, or a saved dataset folder")
    text_column: str = _f("text", "the column (field) holding the text in jsonl/json, parquet, csv or dataset --data")
    out_dir: str = _f("runs/coprocessor", "output folder for checkpoints and metrics")
    init_from: str = _f("", "start from this checkpoint's weights (a new schedule unless --resume)")
    resume: bool = _f(False, "resume from out_dir/last (step, schedule, optimizer, RNG, data position)")
    seq_len: int = _f(512, "tokens per training sequence (T)")
    points: int = _f(16, "augmentation points per sequence (P)")
    n_ahead: int = _f(16, "ahead tokens predicted per point (N_A)")
    batch_size: int = _f(8, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    steps: int = _f(1000, "optimizer steps")
    max_minutes: float = _f(0.0, "stop (and save) after this many minutes; 0 = no limit")
    stop_after: int = _f(0, "stop (and save) after this many steps in this invocation; 0 = no limit")
    lr: float = _f(2e-4, "peak learning rate")
    soft_lr_mult: float = _f(10.0, "learning-rate multiplier for soft tokens and the latent projection")
    warmup: int = _f(100, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "cosine decays to lr * this")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0 = off)")
    precision: str = _f("", "mixed precision: no | bf16 | fp16 (empty = what `accelerate launch` or your "
                            "`accelerate config` file says, else no)")
    report_to: str = _f("none", "trackers besides metrics.jsonl, through accelerate: tensorboard, wandb, trackio, "
                                "mlflow (comma-separated), all (every installed one) or none")
    fast: bool = _f(False, "the fast path (fastpath.py): block-sparse FlexAttention + fused cross-entropy (GPU; compiled there)")
    compile: bool = _f(False, "torch.compile the transformer blocks (GPU; with --fast: the fast path's block functions)")
    cuda_graph: bool = _f(False, "with --fast on one GPU: each step's forward and backward replayed as one CUDA graph "
                                  "(the host queues a step in microseconds; cudagraph.py)")
    mlp: str = _f("auto", "with --fast: the MLPs' kernels: auto (quack where it applies), compiled, quack (the frozen "
                          "decoder's through quack's fused GEMMs: a Hopper GPU, bf16, pip install quack-kernels) "
                          "or quack-all (the coprocessor's too)")
    eval_every: int = _f(100, "held-out evaluation every N steps (0 = off)")
    eval_batches: int = _f(4, "held-out batches per evaluation")
    save_every: int = _f(200, "checkpoint every N steps")
    log_every: int = _f(10, "log metrics every N steps")
    seed: int = _f(0, "seed for data order and augmentation points")
    device: str = _f("", "device (empty = auto)")

    def __post_init__(self):
        for name in ("seq_len", "points", "n_ahead", "batch_size", "grad_accum", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.points > self.seq_len - 2:
            raise ConfigError(f"--points ({self.points}) must be < --seq-len - 1 ({self.seq_len - 1})")
        if self.precision not in ("", "no", "bf16", "fp16"):
            raise ConfigError(f"--precision must be no, bf16 or fp16, got {self.precision!r}")
        bad = [t for t in self.report_to.split(",") if t.strip() not in TRACKERS]
        if bad or not self.report_to.strip():
            raise ConfigError(f"--report-to takes {', '.join(TRACKERS)} (comma-separated), got {self.report_to!r}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.mlp not in MLP_KERNELS:
            raise ConfigError(f"--mlp must be one of {', '.join(MLP_KERNELS)}, got {self.mlp!r}")
        if self.mlp != "auto" and not self.fast:
            raise ConfigError("--mlp picks the fast path's MLP kernels: add --fast")
        if self.cuda_graph and not self.fast:
            raise ConfigError("--cuda-graph replays the fast path's step: add --fast")
        if self.device and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N (empty = auto), got {self.device!r}")
        if self.cuda_graph and self.grad_accum != 1:
            raise ConfigError("--cuda-graph takes one batch per step: use --grad-accum 1 (a larger --batch-size instead)")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict, strict: bool = True):
    """Build a config from a dict; unknown keys are an error (strict) or ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown and strict:
        raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**{k: v for k, v in d.items() if k in names})


def load_yaml(path: str | Path) -> dict:
    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        # PyYAML's message spans several lines; the user needs where and what
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{path} is a folder, not a YAML file") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return d


def check_types(cls, values: dict, where: str) -> dict:
    """`values` with each checked against the type of `cls`'s field of that name (unknown names
    pass through). A wrong type would otherwise fail later with a cryptic error, or worse, compare
    as a string. Floats accept integers and numeric strings: YAML reads `2e-4` (no dot) as a
    string. Returns the converted values; ConfigError names the option."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        want = types.get(k)
        ok = True
        if want == "bool":
            ok = isinstance(v, bool)
        elif want == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif want == "float":
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    ok = False
            else:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                v = float(v) if ok else v
        elif want == "str":
            ok = isinstance(v, str)
        if not ok:
            kind = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[want]
            raise ConfigError(f"{where}: {k} is {v!r} ({type(v).__name__}), expected {kind}")
        out[k] = v
    return out
