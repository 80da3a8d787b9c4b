"""Whether a GEMM of our own with the SwiGLU fused into it beats cuBLAS plus inductor's elementwise
kernel at the fast path's shapes: the MLP's gate and up projections of SmolLM2-135M (K = 576,
N = 1536 each) over the rows of one pass, h = silu(x Wg^T) * (x Wu^T) in bf16.

    python bench/fused_swiglu.py --out results/runs/fused_swiglu.json       # GPU (Triton)

The step spends ~30 ms of its ~243 ms GPU time in the SiLU kernels (results/train_throughput.md):
cuBLAS writes g and u (2 x 3 KB per row) and a fused elementwise kernel reads them back to write
h. One kernel that keeps g and u in registers writes only h (the prefill, which needs no backward),
or h, g and u (the passes that take gradients). Compared side by side, timed steps interleaved
(one of each per round, the order rotated), median ms:

  compiled        torch.compile of F.silu(F.linear(x, wg)) * F.linear(x, wu): cuBLAS + one Triton kernel
  matmuls         the two cuBLAS matmuls alone (a floor for any kernel that writes g and u)
  dual            a Triton dual GEMM (one x tile, two accumulators), SwiGLU in the epilogue
  dual-gu         the same, also storing g and u (what a pass with a backward would need)
  tma             persistent Triton dual GEMM over Hopper's TMA descriptors
  tma-ws          the same with Triton's warp specialisation

Every Triton variant is checked for bitwise equality with the compiled reference (g and u are
rounded to bf16 before the SwiGLU, as the reference rounds its matmul outputs). Measured:
results/train_throughput.md ("A SwiGLU fused into a Triton GEMM").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


try:                                   # Triton is a GPU-only dependency
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    def grid_configs(extra: dict) -> list:
        shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4),
                  (128, 128, 64, 4, 3), (64, 128, 64, 4, 4), (256, 64, 64, 8, 3)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, **extra},
                              num_warps=w, num_stages=s) for m, n, k, w, s in shapes]

    @triton.jit
    def tile_of(tile, in_group, num_pid_m, GROUP_M: tl.constexpr):
        # grouped order: GROUP_M row tiles share the weight tiles they read while resident in L2
        first_m = (tile // in_group) * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        return first_m + (tile % in_group) % size_m, (tile % in_group) // size_m

    @triton.jit
    def swiglu_epilogue(acc_g, acc_u):
        # the reference rounds each matmul's output to bf16, then computes the SwiGLU in fp32
        g = acc_g.to(tl.bfloat16).to(tl.float32)
        u = acc_u.to(tl.bfloat16).to(tl.float32)
        return (g * tl.sigmoid(g) * u).to(tl.bfloat16)

    @triton.autotune(configs=grid_configs({}), key=["M", "N", "K", "STORE_GU"])
    @triton.jit
    def dual(X, WG, WU, H, G, U, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STORE_GU: tl.constexpr):
        # X (M, K), WG and WU (N, K) as nn.Linear keeps them, H/G/U (M, N); all contiguous
        pm, pn = tile_of(tl.program_id(0), GROUP_M * tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_M)
        offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        xp = X + offs_m[:, None] * K + offs_k[None, :]
        gp = WG + offs_n[None, :] * K + offs_k[:, None]                  # (BLOCK_K, BLOCK_N) view of WG^T
        up = WU + offs_n[None, :] * K + offs_k[:, None]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            kmask = offs_k < K - k * BLOCK_K
            x = tl.load(xp, mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & (offs_n[None, :] < N)
            acc_g = tl.dot(x, tl.load(gp, mask=wmask, other=0.0), acc_g)
            acc_u = tl.dot(x, tl.load(up, mask=wmask, other=0.0), acc_u)
            xp += BLOCK_K
            gp += BLOCK_K
            up += BLOCK_K
        out = offs_m[:, None] * N + offs_n[None, :]
        omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(H + out, swiglu_epilogue(acc_g, acc_u), mask=omask)
        if STORE_GU:
            tl.store(G + out, acc_g.to(tl.bfloat16), mask=omask)
            tl.store(U + out, acc_u.to(tl.bfloat16), mask=omask)

    @triton.jit
    def persistent(X, WG, WU, H, M, N, K, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr):
        # one program per SM walks the output tiles; tiles move through TMA descriptors
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        x_d = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        g_d = tl.make_tensor_descriptor(WG, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        u_d = tl.make_tensor_descriptor(WU, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        h_d = tl.make_tensor_descriptor(H, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True, warp_specialize=WS):
            pm, pn = tile_of(tile, GROUP_M * num_pid_n, num_pid_m, GROUP_M)
            om, on = pm * BLOCK_M, pn * BLOCK_N
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(tl.cdiv(K, BLOCK_K)):
                x = x_d.load([om, ki * BLOCK_K])
                acc_g = tl.dot(x, g_d.load([on, ki * BLOCK_K]).T, acc_g)
                acc_u = tl.dot(x, u_d.load([on, ki * BLOCK_K]).T, acc_u)
            h_d.store([om, on], swiglu_epilogue(acc_g, acc_u))

    tma = triton.autotune(configs=grid_configs({"WS": False}), key=["M", "N", "K"])(persistent)
    tma_ws = triton.autotune(configs=grid_configs({"WS": True}), key=["M", "N", "K"])(persistent)


def make_variants(x, wg, wu) -> dict:
    """({name: function of no arguments returning h (M, N)}, {name: its autotuned Triton kernel})
    for x (M, K) and wg, wu (N, K) ("matmuls" returns the pair g, u)."""
    M, K = x.shape
    N = wg.shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    # device-side TMA descriptors need a scratch buffer from the caller
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=x.device, dtype=torch.int8))

    def run_dual(store_gu: bool):
        h = torch.empty(M, N, device=x.device, dtype=x.dtype)
        g, u = (torch.empty_like(h), torch.empty_like(h)) if store_gu else (h, h)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        dual[grid](x, wg, wu, h, g, u, M, N, K, STORE_GU=store_gu)
        return h

    def run_tma(kernel):
        h = torch.empty(M, N, device=x.device, dtype=x.dtype)
        grid = lambda meta: (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
        kernel[grid](x, wg, wu, h, M, N, K, NUM_SMS=sms)
        return h

    compiled = torch.compile(lambda a, b, c: F.silu(F.linear(a, b)) * F.linear(a, c))
    return {
        "compiled": lambda: compiled(x, wg, wu),
        "matmuls": lambda: (F.linear(x, wg), F.linear(x, wu)),
        "dual": lambda: run_dual(False),
        "dual-gu": lambda: run_dual(True),
        "tma": lambda: run_tma(tma),
        "tma-ws": lambda: run_tma(tma_ws),
    }, {"dual": dual, "dual-gu": dual, "tma": tma, "tma-ws": tma_ws}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def measure(rows: int, iters: int, K: int = 576, N: int = 1536) -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(rows, K, device=dev).bfloat16()
    wg = (torch.randn(N, K, device=dev) * K ** -0.5).bfloat16()
    wu = (torch.randn(N, K, device=dev) * K ** -0.5).bfloat16()
    variants, kernels = make_variants(x, wg, wu)
    ref = variants["compiled"]()
    out = {"rows": rows, "K": K, "N": N, "flops": 2 * rows * K * 2 * N, "variants": {}}
    for name, fn in variants.items():
        entry = out["variants"][name] = {"ms": []}
        try:
            h = fn()                                     # autotunes / compiles on the first call
            if name != "matmuls":
                entry["identical"] = bool(torch.equal(h, ref))
            if name in kernels:
                entry["config"] = str(kernels[name].best_config)
        except Exception as e:                            # a kernel that does not build here
            entry["error"] = f"{type(e).__name__}: {e}"[:400]
    names = [n for n, e in out["variants"].items() if "error" not in e]
    for r in range(iters):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out["variants"][name]["ms"].append(a.elapsed_time(b))
    for name in names:
        e = out["variants"][name]
        e["median_ms"] = _median(e["ms"])
        e["tflops"] = out["flops"] / e["median_ms"] / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="32768,65536",
                    help="rows per pass: 32768 = the coprocessor pass, 65536 = prefill and group pass at batch 128")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="results/runs/fused_swiglu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fused_swiglu.py measures Triton kernels and needs a CUDA GPU")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": commit, "command": " ".join(sys.argv), "shapes": []}
    for rows in (int(r) for r in args.rows.split(",")):
        res["shapes"].append(measure(rows, args.iters))
        s = res["shapes"][-1]
        print(f"rows {rows}: " + ", ".join(
            f"{n} {e['median_ms']:.3f} ms ({e['tflops']:.0f} TFLOP/s{'' if e.get('identical', True) else ', DIFFERS'})"
            if "median_ms" in e else f"{n} failed" for n, e in s["variants"].items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
