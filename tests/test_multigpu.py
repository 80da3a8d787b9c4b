"""Training on several processes through `accelerate launch`: two CPU processes over gloo.

    pytest tests/test_multigpu.py

One run, four legs, each resuming the previous one's checkpoint (steps 0-2-3-4-6):

  1. DDP, 2 processes (configs/accelerate/cpu2_gloo.yaml), from scratch to step 2
  2. 1 process (in this process), resumed to step 3
  3. FSDP version 2, 2 processes (configs/accelerate/fsdp.yaml, its code path forced on CPU by
     tests/multigpu_worker.py), resumed to step 4
  4. 1 process, resumed from the FSDP checkpoint to the end (step 6)

Checked on every rank of legs 1 and 3: each rank trains on its own batches, which continue the
rank's own data stream across resumes; the gradient the optimizer steps with is identical on both
ranks and equals the mean of the two ranks' own gradients (recomputed here, in one process, from
the recorded batches and weights); the weights stay identical across ranks; the decoder is never
wrapped, stays frozen and bit-identical to its saved copy; only rank 0 writes checkpoint files.
Checked on the checkpoints: step counts and tokens continue, every rank's data stream is kept
(also across a leg with fewer processes), and an FSDP checkpoint holds whole tensors in the
single-process layout. The coprocessor is gated like the shipped one: the latent gate's bias
trains under DDP and FSDP alike.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cacheaug_core import augment
from cacheaug_core.checkpoint import load_coprocessor
from cacheaug_core.coprocessor import Coprocessor
from cacheaug_core.decoder import load_decoder
from cacheaug_core.train import TextData, data_seed, param_groups, train
from tests.conftest import save_tiny_decoder
from tests.multigpu_worker import COPROCESSOR, train_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


def _free_port() -> int:
    # concurrent test runs on one machine must not share the rendezvous port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, *args: str) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(ROOT / "tests" / "multigpu_worker.py"), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, f"accelerate launch failed:\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}"


def _ranks(report: Path) -> list[tuple[dict, dict]]:
    return [(json.loads((report / f"rank{r}.json").read_text()), load_file(str(report / f"rank{r}.safetensors")))
            for r in (0, 1)]


def _named(t: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + ".")}


def _state(run: Path) -> tuple[dict, dict]:
    return (json.loads((run / "last" / "trainer_state.json").read_text()),
            load_file(str(run / "last" / "trainer_state.safetensors")))


def _mean_local_gradient(decoder_dir: str, w0: dict, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """The mean over ranks of each rank's own gradient at weights w0, in one plain process."""
    dec, tok, _ = load_decoder(decoder_dir)
    cop = Coprocessor(COPROCESSOR, dec).float().train()
    with torch.no_grad():
        for n, p in cop.named_parameters():
            if p.requires_grad:
                p.copy_(w0[n].reshape(p.shape))
    cfg = train_config("", "", "")
    per_rank = []
    for ids, pts in batches:
        cop.zero_grad(set_to_none=True)
        loss, _ = augment.multi_point_loss(dec, cop, ids, pts, cfg.n_ahead, cache=augment.prefill_cache(dec, ids),
                                           pad_id=tok.pad_token_id)
        loss.backward()
        per_rank.append({n: p.grad.clone() for n, p in cop.named_parameters() if p.requires_grad})
    return per_rank, {n: sum(g[n] for g in per_rank) / len(per_rank) for n in per_rank[0]}


def _first_batch(data: TextData, gen_state: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
    cfg = train_config("", "", "")
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.set_state(gen_state)
    return data.sample(cfg.batch_size, cfg.seq_len, g)


def _check_leg(report: Path, decoder_dir: str, wrapper: str, first_ids: list[torch.Tensor], w0_expected: dict):
    (j0, t0), (j1, t1) = _ranks(report)
    for j in (j0, j1):
        assert j["num_processes"] == 2 and j["wrapper"] == wrapper, j
        # the decoder is never wrapped, never trained, and bit-identical to its saved copy on every rank
        assert j["decoder_identical"] and j["decoder_frozen"] and not j["decoder_wrapped"], j
    # only rank 0 writes checkpoint files
    assert j0["writes"] > 0 and j1["writes"] == 0
    # each rank trains on its own batch: the next one of its own data stream
    assert not torch.equal(t0["ids"], t1["ids"])
    assert torch.equal(t0["ids"], first_ids[0]) and torch.equal(t1["ids"], first_ids[1])
    # both ranks start from the same weights: those of the checkpoint (or the fresh coprocessor)
    w0 = _named(t0, "w0")
    for n, v in w0.items():
        assert torch.equal(v, _named(t1, "w0")[n]), n
        torch.testing.assert_close(v.reshape(w0_expected[n].shape), w0_expected[n].float(), rtol=0, atol=0)
    # gradients are synchronised: the optimizer steps with the same gradient on both ranks, and it
    # is the mean of the two ranks' own gradients
    g0, g1 = _named(t0, "grad"), _named(t1, "grad")
    per_rank, mean = _mean_local_gradient(decoder_dir, w0, [(t0["ids"], t0["pts"]), (t1["ids"], t1["pts"])])
    assert set(g0) == set(mean)
    assert mean["gate_bias"].abs().sum() > 0   # the coprocessor is gated: its gate trains on every engine
    for n in mean:
        assert torch.equal(g0[n], g1[n]), n
        torch.testing.assert_close(g0[n].reshape(mean[n].shape), mean[n], rtol=2e-4, atol=1e-6, msg=n)
    flat = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in per_rank]
    assert (flat[0] - flat[1]).norm() > 0.05 * flat[0].norm()  # the two ranks' own gradients really differ
    # the weights stay identical across ranks, and training moved them
    w1 = _named(t0, "w1")
    for n, v in w1.items():
        assert torch.equal(v, _named(t1, "w1")[n]), n
    assert any(not torch.equal(w1[n], w0[n]) for n in w1)
    return w1


@pytest.mark.timeout(300)
def test_two_processes_ddp_fsdp_and_resume_on_other_process_counts(tmp_path):
    decoder_dir = save_tiny_decoder(tmp_path / "decoder", "llama")
    text = tmp_path / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    run = tmp_path / "run"
    dec, tok, info = load_decoder(decoder_dir)
    data = TextData(text, tok, "train")
    cfg = train_config(decoder_dir, str(text), str(run))
    per_step_tokens = cfg.batch_size * cfg.seq_len
    common = ["--decoder", decoder_dir, "--data", str(text), "--out-dir", str(run), "--steps", str(cfg.steps)]

    # 1. DDP, 2 processes, from scratch to step 2
    _launch("cpu2_gloo.yaml", *common, "--stop-after", "2", "--report", str(tmp_path / "leg1"))
    fresh = {n: p.detach() for n, p in Coprocessor(COPROCESSOR, dec).named_parameters() if p.requires_grad}
    starts = [_first_batch(data, seed=data_seed(cfg.seed, r)) for r in (0, 1)]
    w1 = _check_leg(tmp_path / "leg1", decoder_dir, "DistributedDataParallel", starts, fresh)
    meta, tensors = _state(run)
    assert meta["step"] == 2 and meta["num_processes"] == 2 and meta["tokens_seen"] == 2 * 2 * per_step_tokens
    assert {"rng.data", "rng.data.1"} <= set(tensors)
    saved = load_coprocessor(run / "last", dec, info).trainable_state()
    assert all(torch.equal(saved[n].float(), w1[n]) for n in w1)
    stream1 = tensors["rng.data.1"]

    # 2. one process, resumed to step 3: rank 0's stream continues, rank 1's is kept untouched
    train(train_config(decoder_dir, str(text), str(run), resume=True, stop_after=1), COPROCESSOR, show_progress=False)
    meta, tensors = _state(run)
    assert meta["step"] == 3 and meta["num_processes"] == 1
    assert meta["tokens_seen"] == 2 * 2 * per_step_tokens + per_step_tokens
    assert torch.equal(tensors["rng.data.1"], stream1)
    w_step3 = load_coprocessor(run / "last", dec, info).trainable_state()

    # 3. FSDP, 2 processes, resumed to step 4: each rank continues its own stream
    starts = [_first_batch(data, tensors["rng.data"]), _first_batch(data, stream1)]
    _launch("fsdp.yaml", *common, "--stop-after", "1", "--resume", "--fsdp", "--report", str(tmp_path / "leg3"))
    (j0, _), _ = _ranks(tmp_path / "leg3")
    assert j0["distributed_type"].endswith("FSDP")
    w1 = _check_leg(tmp_path / "leg3", decoder_dir, "FSDPCoprocessor", starts, w_step3)
    meta, tensors = _state(run)
    assert meta["step"] == 4 and meta["num_processes"] == 2
    assert meta["tokens_seen"] == 5 * per_step_tokens + 2 * per_step_tokens
    # the FSDP checkpoint holds whole tensors in the single-process layout: weights...
    saved = load_coprocessor(run / "last", dec, info).trainable_state()
    assert all(torch.equal(saved[n].float(), w1[n].reshape(saved[n].shape)) for n in w1)
    # ... and optimizer moments, numbered as a plain optimizer numbers its parameters
    plain = [p for g in param_groups(Coprocessor(COPROCESSOR, dec), cfg) for p in g["params"]]
    for i, p in enumerate(plain):
        for k in ("exp_avg", "exp_avg_sq"):
            assert tensors[f"opt.{i}.{k}"].shape == p.shape, (i, k)

    # 4. one process, resumed from the FSDP checkpoint to the end
    last = train(train_config(decoder_dir, str(text), str(run), resume=True), COPROCESSOR, show_progress=False)
    meta, _ = _state(run)
    assert meta["step"] == cfg.steps and meta["num_processes"] == 1
    final = load_coprocessor(last, dec, info).trainable_state()
    assert all(torch.isfinite(v).all() for v in final.values())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # one training line and one evaluation line per step, written by rank 0 only
    assert [r["step"] for r in lines if "loss" in r] == [r["step"] for r in lines if "eval" in r] == [1, 2, 3, 4, 5, 6]


def test_accelerate_configs():
    """The shipped launch configs parse with accelerate's own reader and say what the docs say."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.mixed_precision == "no"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    fc = fsdp.fsdp_config
    assert fc["fsdp_version"] == 2 and fc["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fc["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fc["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"  # the default SmolLM2 decoder's block
    cpu = load_config_from_file(str(CONFIGS / "cpu2_gloo.yaml"))
    assert cpu.num_processes == 2


def test_throughput_bench_arithmetic(tmp_path):
    """bench/multigpu_throughput.py: the command per GPU count, the timing window, the efficiencies."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("multigpu_throughput", ROOT / "bench" / "multigpu_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.NVLS_OFF == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                              "NVSHMEM_DISABLE_NVLS": "1"}
    assert bench.command(1, "ddp", ["--x"], tiny=False)[1:] == ["-m", "cacheaug_core.cli", "train", "--x"]
    cmd = bench.command(4, "fsdp", ["--x"], tiny=False)
    assert cmd[cmd.index("--config_file") + 1].endswith("fsdp.yaml") and cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-4:] == ["-m", "cacheaug_core.cli", "train", "--x"]
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 9.0, "tokens_seen": 100, "elapsed_s": 5.0},
        {"step": 2, "loss": 8.0, "tokens_seen": 200, "elapsed_s": 6.0},
        {"step": 2, "eval": {}},
        {"step": 4, "loss": 7.0, "tokens_seen": 400, "elapsed_s": 6.5}]))
    tp = bench.throughput(m, warmup_steps=2)
    assert tp["tokens_per_s"] == 400 and tp["step_s"] == 0.25 and tp["measured_steps"] == 2
    rows = bench.scaling([{"engine": "ddp", "gpus": 2, "tokens_per_s": 190.0},
                          {"engine": "ddp", "gpus": 4, "tokens_per_s": 360.0}], base_tps=100.0)
    assert [r["efficiency"] for r in rows] == [0.95, 0.9]
    assert [r["marginal_efficiency"] for r in rows] == [0.9, 0.85]
