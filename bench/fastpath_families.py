"""The fast path against the dense transformers path on the families it covers beyond Llama:
random decoders shaped like Mistral-7B's (no window), Qwen3's and OLMo-2's blocks (scaled down in
depth and width), on a GPU with FlexAttention and the compiled blocks, in float32 and bf16.

    python bench/fastpath_families.py --out results/fastpath_families.json          # GPU
    python bench/fastpath_families.py --tiny --out /tmp/ff.json                     # CPU smoke run

For each family it records the largest differences between `fastpath.multi_point_loss` and
`augment.multi_point_loss` (the loss, every coprocessor gradient, relative to the gradient's
largest entry) and between `fastpath.score_every` and the dense scoring (nats). No timings: this
is a correctness check on the device; the family matrix of tests/test_families.py runs the same
comparisons on CPU with the fast path's dense attention.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cacheaug_core import augment, families, fastpath, masks  # noqa: E402
from cacheaug_core.config import CoprocessorConfig  # noqa: E402
from cacheaug_core.coprocessor import Coprocessor  # noqa: E402
from cacheaug_core.decoder import freeze  # noqa: E402

# (family, vocab, layers, hidden): Mistral-7B's head layout (32 q heads, 8 kv heads, head dim 128)
# at 4 layers, Qwen3 and OLMo-2 with head dim 64
SHAPES = {"mistral": (32000, 4, 4096), "qwen3": (32000, 4, 1024), "olmo2": (32000, 4, 1024)}
HEADS = {"mistral": (32, 8), "qwen3": (16, 8), "olmo2": (16, 16)}


def decoder(name: str, tiny: bool, device, dtype):
    vocab, layers, hidden = (128, 2, 64) if tiny else SHAPES[name]
    cfg = families.FAMILIES[name].make_config(vocab, layers, hidden, 8)
    if not tiny:
        cfg.num_attention_heads, cfg.num_key_value_heads = HEADS[name]
        cfg.head_dim = hidden // cfg.num_attention_heads
        cfg.intermediate_size = 3 * hidden
        cfg.max_position_embeddings = 4096
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dec = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return freeze(dec).to(device)


def compare(name: str, tiny: bool, device, dtype) -> dict:
    # bf16 as the trainer runs it: bf16 weights under bf16 autocast (the fast path's attention and
    # norms compute in float32 and hand the projections float inputs, which autocast casts)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return _compare(name, tiny, device, dtype)


def _compare(name: str, tiny: bool, device, dtype) -> dict:
    dec = decoder(name, tiny, device, dtype)
    why = fastpath.unsupported(dec, None, device=device)
    if why is not None:
        return {"family": name, "refused": why}
    cop = Coprocessor(CoprocessorConfig(num_latents=4 if tiny else 16, num_layers=2, latent_gate=True,
                                        gate_init=-1.0), dec).to(dtype)
    T, P, B, A = (24, 4, 2, 4) if tiny else (512, 16, 2, 16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, dec.config.vocab_size, (B, T), generator=g).to(device)
    pts = masks.sample_points(T, P, B, g).to(device)
    attention = "auto" if device.type == "cuda" else "dense"
    grads = {}
    losses = {}
    for kind in ("dense", "fast"):
        cop.zero_grad(set_to_none=True)
        if kind == "dense":
            loss, _ = augment.multi_point_loss(dec, cop, ids, pts, A)
        else:
            loss = fastpath.multi_point_loss(dec, cop, ids, pts, A, attention=attention)
        loss.backward()
        losses[kind] = loss.item()
        grads[kind] = {n: p.grad.float().clone() for n, p in cop.named_parameters() if p.grad is not None}
    rel = max(float((grads["fast"][n] - grads["dense"][n]).abs().max() / grads["dense"][n].abs().max().clamp(min=1e-12))
              for n in grads["dense"])
    with torch.no_grad():
        one = ids[:1, : min(T, 128)]
        aug_f, base_f = fastpath.score_every(dec, cop, one, positions=A)
        aug_d, base_d = augment.score_after_every_token(dec, cop, one, positions=A, fast=False)
    ok = ~torch.isnan(aug_d)
    return {"family": name, "shape": dict(vocab=dec.config.vocab_size, layers=dec.config.num_hidden_layers,
                                          hidden=dec.config.hidden_size, heads=dec.config.num_attention_heads,
                                          kv_heads=dec.config.num_key_value_heads, T=T, points=P, batch=B, n_ahead=A),
            "loss_dense": losses["dense"], "loss_fast": losses["fast"],
            "loss_abs_diff": abs(losses["dense"] - losses["fast"]),
            "grad_max_rel_diff": rel,
            "score_max_abs_diff_nats": float((aug_f[ok] - aug_d[ok]).abs().max()),
            "base_max_abs_diff_nats": float((base_f - base_d).nan_to_num().abs().max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--families", default="mistral,qwen3,olmo2")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = []
    for n in args.families.split(","):
        for dt in dtypes:
            try:
                row = compare(n, args.tiny, device, dt)
            except Exception as e:   # recorded, not hidden: the other families still run
                row = {"family": n, "error": f"{type(e).__name__}: {e}"}
            rows.append(row | {"dtype": str(dt).removeprefix("torch.")})
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import transformers

    out = {"command": " ".join(["python", "bench/fastpath_families.py", *(argv or sys.argv[1:])]), "commit": commit,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
