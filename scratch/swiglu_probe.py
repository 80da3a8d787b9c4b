"""Probe: a Triton dual GEMM computing silu(x Wg^T) * (x Wu^T) in one kernel against cuBLAS + inductor."""
import json, os, sys, time
import torch, triton, triton.language as tl
import torch.nn.functional as F


def configs():
    out = []
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4),
                             (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (256, 64, 64, 8, 3)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return out


@triton.autotune(configs=configs(), key=["M", "N", "K", "STORE_GU"])
@triton.jit
def _swiglu_fwd(X, WG, WU, H, G, U, M, N, K, sxm, swn, shm,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                STORE_GU: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    xp = X + offs_m[:, None] * sxm + offs_k[None, :]
    gp = WG + offs_n[None, :] * swn + offs_k[:, None]
    up = WU + offs_n[None, :] * swn + offs_k[:, None]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = offs_k < K - k * BLOCK_K
        x = tl.load(xp, mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
        wg = tl.load(gp, mask=kmask[:, None] & (offs_n[None, :] < N), other=0.0)
        wu = tl.load(up, mask=kmask[:, None] & (offs_n[None, :] < N), other=0.0)
        acc_g = tl.dot(x, wg, acc_g)
        acc_u = tl.dot(x, wu, acc_u)
        xp += BLOCK_K
        gp += BLOCK_K
        up += BLOCK_K
    g = acc_g.to(H.dtype.element_ty)
    u = acc_u.to(H.dtype.element_ty)
    gf = g.to(tl.float32)
    h = gf * tl.sigmoid(gf) * u.to(tl.float32)
    omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    o = offs_m[:, None] * shm + offs_n[None, :]
    tl.store(H + o, h.to(H.dtype.element_ty), mask=omask)
    if STORE_GU:
        tl.store(G + o, g, mask=omask)
        tl.store(U + o, u, mask=omask)


def swiglu(x, wg, wu, store_gu=False):
    M, K = x.shape
    N = wg.shape[0]
    h = torch.empty(M, N, device=x.device, dtype=x.dtype)
    g = torch.empty_like(h) if store_gu else h
    u = torch.empty_like(h) if store_gu else h
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _swiglu_fwd[grid](x, wg, wu, h, g, u, M, N, K, x.stride(0), wg.stride(0), h.stride(0), STORE_GU=store_gu)
    return h, g, u


def pconfigs(ws):
    out = []
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4),
                             (128, 128, 64, 4, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 64, 64, 8, 3)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "WS": ws},
                                 num_warps=w, num_stages=s))
    return out


@triton.jit
def _pid(tile_id, in_group, num_pid_m, GROUP_M: tl.constexpr):
    first_m = (tile_id // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % in_group) % size_m, (tile_id % in_group) // size_m


@triton.jit
def _swiglu_tma_body(X, WG, WU, H, M, N, K, NUM_SMS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     WS: tl.constexpr):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    x_d = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    g_d = tl.make_tensor_descriptor(WG, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    u_d = tl.make_tensor_descriptor(WU, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    h_d = tl.make_tensor_descriptor(H, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    in_group = GROUP_M * num_pid_n
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True, warp_specialize=WS):
        pm, pn = _pid(tile, in_group, num_pid_m, GROUP_M)
        om = pm * BLOCK_M
        on = pn * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BLOCK_K
            x = x_d.load([om, ok])
            acc_g = tl.dot(x, g_d.load([on, ok]).T, acc_g)
            acc_u = tl.dot(x, u_d.load([on, ok]).T, acc_u)
        g = acc_g.to(tl.bfloat16).to(tl.float32)
        u = acc_u.to(tl.bfloat16).to(tl.float32)
        h_d.store([om, on], (g * tl.sigmoid(g) * u).to(tl.bfloat16))


_tma_nows = triton.autotune(configs=pconfigs(False), key=["M", "N", "K"])(_swiglu_tma_body)
_tma_ws = triton.autotune(configs=pconfigs(True), key=["M", "N", "K"])(_swiglu_tma_body)


def _alloc(size, alignment, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def swiglu_tma(x, wg, wu, kern):
    triton.set_allocator(_alloc)
    M, K = x.shape
    N = wg.shape[0]
    h = torch.empty(M, N, device=x.device, dtype=x.dtype)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = lambda meta: (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)
    kern[grid](x, wg, wu, h, M, N, K, NUM_SMS=sms)
    return h


def ref_fn(x, wg, wu):
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


def ref_gu(x, wg, wu):
    g, u = F.linear(x, wg), F.linear(x, wu)
    return F.silu(g) * u, g, u


def bench(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    out = {"triton": triton.__version__, "torch": torch.__version__, "rows": []}
    dev = "cuda"
    torch.manual_seed(0)
    K, N = 576, 1536
    wg = (torch.randn(N, K, device=dev) * K ** -0.5).bfloat16()
    wu = (torch.randn(N, K, device=dev) * K ** -0.5).bfloat16()
    cref = torch.compile(ref_fn)
    cgu = torch.compile(ref_gu)
    for M in (32768, 65536):
        x = torch.randn(M, K, device=dev).bfloat16()
        h_ref = cref(x, wg, wu)
        h, g, u = swiglu(x, wg, wu, store_gu=True)
        h2, _, _ = swiglu(x, wg, wu)
        err = (h.float() - h_ref.float()).abs().max().item()
        same = (h == h_ref).float().mean().item()
        flops = 2 * M * K * 2 * N
        rows = {"M": M,
                "ref_ms": bench(lambda: cref(x, wg, wu)),
                "ref_gu_ms": bench(lambda: cgu(x, wg, wu)),
                "triton_h_ms": bench(lambda: swiglu(x, wg, wu)),
                "triton_hgu_ms": bench(lambda: swiglu(x, wg, wu, True)),
                "mm_only_ms": bench(lambda: (F.linear(x, wg), F.linear(x, wu))),
                "max_abs_err": err, "frac_identical": same, "max_abs_ref": h_ref.float().abs().max().item(),
                "equal_h_h2": bool(torch.equal(h, h2)),
                "config": str(_swiglu_fwd.best_config)}
        for name, kern in (("tma", _tma_nows), ("tma_ws", _tma_ws)):
            try:
                ht = swiglu_tma(x, wg, wu, kern)
                rows[name + "_equal"] = bool(torch.equal(ht, h_ref))
                rows[name + "_ms"] = bench(lambda: swiglu_tma(x, wg, wu, kern))
                rows[name + "_tflops"] = flops / rows[name + "_ms"] / 1e9
                rows[name + "_config"] = str(kern.best_config)
            except Exception as e:
                rows[name + "_error"] = repr(e)[:300]
        for k in ("ref_ms", "triton_h_ms", "mm_only_ms", "triton_hgu_ms", "ref_gu_ms"):
            rows[k.replace("_ms", "_tflops")] = flops / rows[k] / 1e9
        out["rows"].append(rows)
        print(json.dumps(rows, indent=1), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "swiglu_probe.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
