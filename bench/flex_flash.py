"""FlexAttention's Triton kernels against its FLASH backend (FlashAttention 4's CuTe DSL kernels,
`kernel_options={"BACKEND": "FLASH"}`) on the fast path's two attention calls: the group pass and
the coprocessor pass at the reference shape (SmolLM2-135M heads: 9 query heads, 3 key/value heads,
head dim 64; T = 512, 16 points; groups of 32 rows, 16 soft tokens), forward + backward.

    python bench/flex_flash.py --out results/runs/flex_flash.json            # GPU; FLASH needs flash-attn-4

The step spends ~43 ms of its ~243 ms GPU time in FlexAttention (results/train_throughput.md).
Variants, compiled, timed in turns (one of each per round), median ms per call:

  triton-64     the fast path's default: 64 x 64 BlockMask blocks, the tuned tiles, no key/value
                gradients for the frozen prefix (`masks.without_prefix_key_grads`)
  flash-128     BACKEND FLASH with 128 x 128 blocks (its Hopper backward walks 128-row query tiles).
                Its backward accumulates the query gradients while walking key blocks, so the
                prefix key blocks must keep their query blocks: no frozen-prefix trick here
  flash-128x64  the same with 64-key blocks, where the kernel takes them

Each variant's output and gradients (queries, the appended rows' own keys and values) are
compared with triton-64's. FLASH needs `flash-attn-4` and `nvidia-cutlass-dsl` (not in the
project's dependencies); without them its variants are reported as unavailable.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cacheaug_core import fastpath, masks  # noqa: E402

H, H_KV, HD = 9, 3, 64


def make_inputs(B: int, T: int, P: int, G: int, seed: int = 0):
    """Random q (B, H, P*G, hd), own k/v (B, H_kv, P*G, hd) needing gradients, a frozen prefix
    k/v (B, H_kv, T, hd), sorted points (B, P), an upstream gradient like q."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    Q = P * G

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    points = masks.sample_points(T, P, B, torch.Generator().manual_seed(seed)).cuda()
    return dict(q=rnd(B, H, Q, HD), k=rnd(B, H_KV, Q, HD), v=rnd(B, H_KV, Q, HD),
                k_past=rnd(B, H_KV, T, HD), v_past=rnd(B, H_KV, T, HD), dout=rnd(B, H, Q, HD),
                points=points)


def variant(name: str, T: int, points: torch.Tensor, G: int):
    """(block mask, kernel options) of a variant."""
    if name == "triton-64":
        fastpath._allow_small_blocks()
        bm = masks.group_block_mask(T, points, G, block_size=(64, 64))
        bm = masks.without_prefix_key_grads(bm, T)
        return bm, fastpath._main_kernel(fastpath.fit_kernel_options(fastpath.TUNED_KERNEL_OPTIONS, 64), points.device)
    blocks = {"flash-128": (128, 128), "flash-128x64": (128, 64)}[name]
    return masks.group_block_mask(T, points, G, block_size=blocks), {"BACKEND": "FLASH"}


def make_step(bm, options, scale: float):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def step(x, backward: bool = True):
        q = x["q"].detach().requires_grad_(backward)
        k = x["k"].detach().requires_grad_(backward)
        v = x["v"].detach().requires_grad_(backward)
        K = torch.cat([x["k_past"], k], dim=2)
        V = torch.cat([x["v_past"], v], dim=2)
        o = flex(q, K, V, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=options)
        if not backward:
            return o, None
        o.backward(x["dout"])
        return o, (q.grad, k.grad, v.grad)

    return step


def compare(a, b) -> dict:
    a, b = a.float().flatten(), b.float().flatten()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return {"cosine": round(cos, 6), "max_abs_diff": float((a - b).abs().max()),
            "rel_err": float((a - b).norm() / b.norm().clamp_min(1e-30))}


def timed(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def spread(times: list[float]) -> tuple[float, list[float]]:
    """Timings (ms) -> (median, [min, max]), rounded to the microsecond."""
    t = sorted(times)
    return round(t[len(t) // 2], 3), [round(t[0], 3), round(t[-1], 3)]


def run_header(packages: tuple[str, ...]) -> dict:
    """What a result file says of its run: GPU, torch, commit, command, and the packages' versions
    (None where one is not installed)."""
    import importlib.metadata as md

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
           "command": " ".join(["python"] + sys.argv)}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def save(result: dict, out: str) -> int:
    """Write a result file (its folders made), say where; the exit status."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def run_pass(label: str, B: int, T: int, P: int, G: int, names: list[str], rounds: int, iters: int) -> dict:
    x = make_inputs(B, T, P, G)
    scale = HD ** -0.5
    steps, out, ref = {}, {"pass": label, "batch": B, "T": T, "points": P, "group_rows": G, "variants": {}}, None
    for name in names:
        entry = out["variants"][name] = {}
        try:
            bm, options = variant(name, T, x["points"], G)
            step = make_step(bm, options, scale)
            t0 = time.perf_counter()
            o, grads = step(x)
            torch.cuda.synchronize()
            entry["first_call_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:   # a backend that is missing or refuses these shapes: say why, go on
            entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"[{label}] {name}: {entry['error']}", flush=True)
            continue
        steps[name] = step
        if ref is None:
            ref = (o, grads)
        else:
            entry["vs_" + names[0]] = {"out": compare(o, ref[0]), "dq": compare(grads[0], ref[1][0]),
                                       "dk_own": compare(grads[1], ref[1][1]), "dv_own": compare(grads[2], ref[1][2])}
    times = {n: {"fwd_bwd": [], "fwd": []} for n in steps}
    for r in range(rounds):
        order = list(steps)[r % max(1, len(steps)):] + list(steps)[:r % max(1, len(steps))]
        for n in order:
            times[n]["fwd_bwd"].append(timed(lambda: steps[n](x), iters))
            with torch.no_grad():
                times[n]["fwd"].append(timed(lambda: steps[n](x, backward=False), iters))
    for n, t in times.items():
        e = out["variants"][n]
        for k, v in t.items():
            e[k + "_ms"], e[k + "_ms_min_max"] = spread(v)
        print(f"[{label}] {n}: fwd+bwd {e['fwd_bwd_ms']:.3f} ms, fwd {e['fwd_ms']:.3f} ms", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--ahead", type=int, default=16)
    ap.add_argument("--variants", default="triton-64,flash-128,flash-128x64")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="results/runs/flex_flash.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/flex_flash.py needs a GPU", file=sys.stderr)
        return 2
    names = a.variants.split(",")
    G = fastpath._aligned(a.latents + a.ahead - 1, 32)     # the group pass's padded group (31 -> 32)
    result = {**run_header(("flash-attn-4", "nvidia-cutlass-dsl")), "passes": []}
    for label, G_ in (("group", G), ("coprocessor", a.latents)):
        result["passes"].append(run_pass(label, a.batch, a.T, a.points, G_, names, a.rounds, a.iters))
        torch.cuda.empty_cache()
    return save(result, a.out)


if __name__ == "__main__":
    sys.exit(main())
