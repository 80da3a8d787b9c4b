"""One process of the multi-process training test (tests/test_multigpu.py), started by `accelerate launch`.

    accelerate launch --config_file configs/accelerate/cpu2_gloo.yaml tests/multigpu_worker.py \
        --decoder DIR --data FILE --out-dir RUN --report DIR [--resume] [--fsdp] ...

It runs `cacheaug_core.train.train` unchanged and records, per rank, what the test checks:
the first batch the rank trained on, the weights and the gradient the optimizer stepped with at
the first step, the coprocessor's weights after training, whether the decoder is bit-identical to
its saved copy and still frozen, and how many checkpoint files the rank wrote. Everything goes to
`REPORT/rank{R}.json` and `REPORT/rank{R}.safetensors`.

`--fsdp` runs accelerate's FSDP (version 2) code path on CPU processes. accelerate turns FSDP on
only for accelerators, but the plugin built from the launcher's environment (the FSDP_* variables
that configs/accelerate/fsdp.yaml sets) and torch's `fully_shard` work on CPU over gloo, so the
worker switches the accelerator's state to FSDP after it is created; `prepare`, gradient
reduction, clipping and the state-dict gathering then take the same code path as on GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402
from safetensors.torch import save_file as _save_file  # noqa: E402

from cacheaug_core import augment, checkpoint  # noqa: E402
from cacheaug_core import train as train_mod  # noqa: E402
from cacheaug_core.config import CoprocessorConfig, TrainConfig  # noqa: E402
from cacheaug_core.decoder import load_decoder  # noqa: E402

# gated (the shipped layout): the gate's bias is a forward output of the sharded coprocessor
COPROCESSOR = CoprocessorConfig(num_latents=2, num_layers=1, refeed_last=True, hide_point=True, shift_ahead=False,
                                latent_gate=True, gate_init=-1.0)


def train_config(decoder: str, data: str, out_dir: str, **kw) -> TrainConfig:
    """The test's training settings, shared with the in-process runs of tests/test_multigpu.py.
    The clip threshold is far above any gradient norm: clipping runs (its code path under DDP and
    FSDP is exercised) but multiplies by exactly 1, so the recorded gradient is the synchronised one.
    Held-out evaluation runs after every step, so its path (collective under FSDP) runs too."""
    base = dict(decoder=decoder, data=data, out_dir=out_dir, seq_len=48, points=6, n_ahead=4, batch_size=2, steps=6,
                warmup=1, lr=3e-3, grad_clip=1e9, eval_every=1, eval_batches=1, save_every=1000, log_every=1,
                device="cpu")
    return TrainConfig(**(base | kw))


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one tensor (FSDP keeps DTensor shards: gathering is collective)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().cpu().clone()


def _force_fsdp_on_cpu() -> None:
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class FSDPOnCPU(accelerate.Accelerator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()   # from the launcher's FSDP_* variables
            self.state.distributed_type = DistributedType.FSDP
            # AcceleratorState copies the process state's type each time it is constructed
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.Accelerator = FSDPOnCPU  # train() imports it by name at call time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decoder", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--stop-after", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--fsdp", action="store_true")
    args = ap.parse_args(argv)
    if args.fsdp:
        _force_fsdp_on_cpu()

    seen: dict = {}
    writes = [0]

    real_loss = augment.multi_point_loss

    def loss_spy(decoder, coprocessor, ids, pts, *a, **kw):
        seen.setdefault("decoder", decoder)
        seen.setdefault("model", coprocessor)
        if torch.is_grad_enabled() and "ids" not in seen:
            seen["ids"], seen["pts"] = ids.detach().cpu().clone(), pts.detach().cpu().clone()
        return real_loss(decoder, coprocessor, ids, pts, *a, **kw)

    augment.multi_point_loss = loss_spy

    def before_step(opt, a, kw):
        # Only the first training step (FSDP's optimizer-state loading may step once with zero
        # gradients before any batch is drawn). Runs on every rank at the same step.
        if "ids" not in seen or "grad" in seen:
            return
        core = getattr(seen["model"], "module", seen["model"])
        named = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
        seen["grad"] = {n: _whole(p.grad) for n, p in named}
        seen["w0"] = {n: _whole(p) for n, p in named}

    register_optimizer_step_pre_hook(before_step)

    def counted(*a, **kw):
        writes[0] += 1
        return _save_file(*a, **kw)

    for mod in (checkpoint, train_mod):  # every checkpoint file is a safetensors write through one of these
        if hasattr(mod, "save_file"):
            mod.save_file = counted

    cfg = train_config(args.decoder, args.data, args.out_dir, steps=args.steps, stop_after=args.stop_after,
                       resume=args.resume)
    last = train_mod.train(cfg, COPROCESSOR, show_progress=False)

    from accelerate import PartialState

    state = PartialState()
    rank = state.process_index
    core = getattr(seen["model"], "module", seen["model"])
    w1 = {n: _whole(p) for n, p in core.named_parameters() if p.requires_grad}
    decoder = seen["decoder"]
    original, _, _ = load_decoder(args.decoder)
    ref = original.state_dict()
    identical = all(torch.equal(v, ref[k]) for k, v in decoder.state_dict().items())
    frozen = all(not p.requires_grad and p.grad is None for p in decoder.parameters())
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    tensors = {"ids": seen["ids"], "pts": seen["pts"]}
    tensors |= {f"grad.{n}": v for n, v in seen["grad"].items()}
    tensors |= {f"w0.{n}": v for n, v in seen["w0"].items()}
    tensors |= {f"w1.{n}": v for n, v in w1.items()}
    _save_file({k: v.contiguous() for k, v in tensors.items()}, str(report / f"rank{rank}.safetensors"))
    (report / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "num_processes": state.num_processes, "distributed_type": str(state.distributed_type),
        "wrapper": type(seen["model"]).__name__, "decoder_identical": identical, "decoder_frozen": frozen,
        "decoder_wrapped": decoder is seen["model"] or hasattr(decoder, "module"), "writes": writes[0],
        "checkpoint": str(last)}))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
