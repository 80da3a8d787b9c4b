"""The MLP of one layer with the SwiGLU fused into its GEMMs (quack's CuTe DSL kernels:
`gemm_gated` writes silu(g) * u from the gate/up GEMM's epilogue, `gemm_dgated` the SwiGLU's
backward from the down projection's input-gradient GEMM) against the fast path's compiled
cuBLAS + inductor MLP, at the fast path's shapes (SmolLM2-135M: d = 576, hidden 1536).

    python bench/quack_mlp.py --out results/runs/quack_mlp.json     # GPU; needs quack-kernels

Passes (rows: the reference shape at batch 128):
  prefill      65,536 rows, forward only (the frozen decoder over the original tokens)
  group        65,536 rows, forward + input gradient (the frozen decoder over the groups)
  coprocessor  32,768 rows, forward + input and weight gradients (the trained copy)

Variants, timed in turns, median ms per call:
  compiled     torch.compile of down(silu(gate(h)) * up(h)), the fast path's MLP today
  quack        quack.mlp.mlp_func with gate and up as one weight (concat layout), tuned
  quack-rc     the same recomputing g, u in the backward instead of storing them
  quack-compiled  quack's function inside torch.compile (what the fast path would run)

Outputs and gradients are compared with `compiled`'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flex_flash import compare, run_header, save, spread, timed  # noqa: E402  (the same helpers: cosine/relative error, CUDA-event timing, median and range)

D, HID = 576, 1536
PASSES = {"prefill": (65536, "none"), "group": (65536, "dx"), "coprocessor": (32768, "all")}


def reference(h, wg, wu, wd):
    return F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)


def make(name: str, wg, wu, wd):
    if name == "compiled":
        fn = torch.compile(reference, dynamic=False)
        return lambda h, w1, w2: fn(h, wg, wu, wd) if w1 is None else fn(h, *w1.split(HID), w2)
    from quack.mlp import mlp_func

    rc = name.startswith("quack-rc")

    def q(h, w1, w2):
        return mlp_func(h, w1, w2, activation="swiglu", recompute=rc, concat_layout=True)

    if name.endswith("compiled"):
        q = torch.compile(q, dynamic=False)
    w1_frozen = torch.cat([wg, wu])
    return lambda h, w1, w2: q(h, w1_frozen if w1 is None else w1, wd if w2 is None else w2)


def run_pass(label: str, names: list[str], rounds: int, iters: int) -> dict:
    rows, grads = PASSES[label]
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    h = torch.randn(rows, D, generator=g, **bf)
    wg, wu = (torch.randn(HID, D, generator=g, **bf) * D ** -0.5 for _ in range(2))
    wd = torch.randn(D, HID, generator=g, **bf) * HID ** -0.5
    dout = torch.randn(rows, D, generator=g, **bf)

    def call(fn):
        if grads == "none":
            with torch.no_grad():
                return fn(h, None, None), ()
        x = h.detach().requires_grad_()
        if grads == "all":
            w1 = torch.cat([wg, wu]).requires_grad_()
            w2 = wd.detach().requires_grad_()
            y = fn(x, w1, w2)
            y.backward(dout)
            return y, (x.grad, w1.grad, w2.grad)
        y = fn(x, None, None)
        y.backward(dout)
        return y, (x.grad,)

    out = {"pass": label, "rows": rows, "gradients": grads, "variants": {}}
    fns, ref = {}, None
    for n in names:
        entry = out["variants"][n] = {}
        try:
            fn = make(n, wg, wu, wd)
            t0 = time.perf_counter()
            y, gr = call(fn)
            torch.cuda.synchronize()
            entry["first_call_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:   # a missing package or a refused shape: say why, go on
            entry["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"[{label}] {n}: {entry['error']}", flush=True)
            continue
        fns[n] = fn
        if ref is None:
            ref = (y, gr)
        else:
            entry["vs_" + names[0]] = {"out": compare(y, ref[0]),
                                       **{f"grad{i}": compare(a, b) for i, (a, b) in enumerate(zip(gr, ref[1]))}}
    times = {n: [] for n in fns}
    keys = list(fns)
    for r in range(rounds):
        for n in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[n].append(timed(lambda: call(fns[n]), iters))
    for n, t in times.items():
        e = out["variants"][n]
        e["ms"], e["ms_min_max"] = spread(t)
        print(f"[{label}] {n}: {e['ms']:.3f} ms ({e['ms_min_max'][0]}-{e['ms_min_max'][1]})", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="compiled,quack,quack-rc,quack-compiled")
    ap.add_argument("--passes", default="prefill,group,coprocessor")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="results/runs/quack_mlp.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/quack_mlp.py needs a GPU", file=sys.stderr)
        return 2
    result = {**run_header(("quack-kernels", "nvidia-cutlass-dsl")), "passes": []}
    for p in a.passes.split(","):
        result["passes"].append(run_pass(p, a.variants.split(","), a.rounds, a.iters))
    return save(result, a.out)


if __name__ == "__main__":
    sys.exit(main())
