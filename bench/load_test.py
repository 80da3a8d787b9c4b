"""Load test of the app: concurrent `gradio_client` clients, each sending a fixed number of requests
mixed over the model endpoints, against the app served on 127.0.0.1 with a tiny random decoder.

    python bench/load_test.py                                   # 16 clients x 10 requests -> results/load_test.json
    python bench/load_test.py --clients 4 --requests 3 --burst 0 --out /tmp/load.json
    python bench/load_test.py --decoder path/to/decoder        # any local transformers folder

The app (`app.build_demo` on a Workbench) runs in a child process on a free port; the clients are
threads of this process. Recorded in the JSON, with command, commit and device:

* errors: exceptions and results that do not look like the endpoint's output (must be zero);
* latency percentiles per endpoint and overall, as a client sees them (queue wait included), and
  the time the model was busy, so queue wait and service time can be told apart;
* queue behaviour: model events share one concurrency group with limit 1 (app.py), so one runs at
  a time and the rest wait in the queue. The Workbench methods the handlers call are wrapped with
  a counter in the server process; the largest number running at once must be 1. A last phase
  submits `--burst` requests at once, more than the queue's 32 places: the surplus must be
  refused with "Queue is full", the rest served;
* memory: the server process's RSS sampled every `--sample-every` seconds over the measured
  phase: start, middle, end, peak and a 20-point series. Warm-up requests (one per endpoint, then
  one per client at once) come before the start mark, so first-use allocations are not counted.

Every client loop is bounded (a fixed number of requests, each with a timeout) and the server
process ends when told or when nobody talks to it for 10 minutes, so the run ends by itself. The
tiny decoder keeps the model's share small, so the run measures the serving path (queue, threads,
serialisation, figures and exports). `run()` is what tests/test_reliability.py calls for its quick
version; docs/reliability.md discusses the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

ENDPOINTS = ("/generate", "/analyze", "/token_detail", "/latents", "/model_info")
WORDS = ("the cat sat on a mat while rain fell softly over quiet hills and old stone bridges near the river "
         "bank where children played with bright red kites until evening light faded").split()
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n)) + "."


def request_args(endpoint: str, rng: np.random.Generator) -> tuple:
    """Inputs in the order of app.py's event wiring; small sizes keep one request short."""
    if endpoint == "/generate":     # prompt, extra arms, chat, max new tokens, temperature, top-p, top-k, seed, ...
        return (_text(rng, 6), [], True, 8, 0.0, 1.0, 0, int(rng.integers(1000)), 0, 0)
    if endpoint == "/analyze":      # text, mode, point, positions, ahead, top-k
        mode = "every" if rng.random() < 0.3 else "once"
        return (_text(rng, 10), mode, 4, 4, 1, 5)    # point 4: token 10 of /token_detail is scored
    if endpoint == "/token_detail":  # top-k, token index (of the session's last /analyze)
        return (5, 10)
    if endpoint == "/latents":      # prompts, dims, colour by, top-k, continuation
        return (_text(rng, 4) + "\n" + _text(rng, 5), 2, "prompt", 3, " and then" if rng.random() < 0.5 else "")
    if endpoint == "/model_info":
        return ()
    raise ValueError(endpoint)


def check_result(endpoint: str, out) -> None:
    """Raise if a result does not look like the endpoint's output (an error shown as data counts too)."""
    if endpoint == "/generate":
        dec, aug, *_, status, run_json = out
        assert isinstance(dec, str) and isinstance(aug, str) and str(status).startswith("Done:"), status
    elif endpoint == "/analyze":
        notice, tokens_html, summary, *_ = out
        assert "span" in tokens_html and summary["data"], "empty analysis"
    elif endpoint == "/token_detail":
        table, detail = out
        assert len(table["data"]) == 5 and "KL" in detail, detail
    elif endpoint == "/latents":
        fig, info, readout, *_ = out
        assert fig["type"] == "plotly" and readout["data"], "empty latents"
    elif endpoint == "/model_info":
        banner, status, card, evaluation, err = out
        assert status.get("decoder") and err == "", err


class ConcurrencyProbe:
    """Counts calls running at once in the wrapped Workbench methods (generators until exhausted)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = 0
        self.max = 0
        self.calls = 0
        self.busy_s = 0.0      # time with at least one model call running
        self._since = 0.0

    def _enter(self):
        with self.lock:
            if self.now == 0:
                self._since = time.perf_counter()
            self.now += 1
            self.calls += 1
            self.max = max(self.max, self.now)

    def _exit(self):
        with self.lock:
            self.now -= 1
            if self.now == 0:
                self.busy_s += time.perf_counter() - self._since

    def wrap(self, wb, names=("generate_pair", "score_text", "score_every", "latents", "status")) -> None:
        import inspect

        for name in names:
            fn = getattr(wb, name)
            if inspect.isgeneratorfunction(fn):
                def wrapped(*a, _fn=fn, **kw):
                    self._enter()
                    try:
                        yield from _fn(*a, **kw)
                    finally:
                        self._exit()
            else:
                def wrapped(*a, _fn=fn, **kw):
                    self._enter()
                    try:
                        return _fn(*a, **kw)
                    finally:
                        self._exit()
            setattr(wb, name, wrapped)


class RssSampler(threading.Thread):
    """RSS of one process every `every` seconds, as (perf_counter time, bytes)."""

    def __init__(self, every: float, pid: int | None = None):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.proc = psutil.Process(pid)

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), self.proc.memory_info().rss))
            self.stop.wait(self.every)


def _pct(xs) -> dict:
    if not xs:
        return {}
    a = np.asarray(xs)
    return {"n": len(xs), "p50_s": round(float(np.percentile(a, 50)), 4), "p90_s": round(float(np.percentile(a, 90)), 4),
            "p95_s": round(float(np.percentile(a, 95)), 4), "p99_s": round(float(np.percentile(a, 99)), 4),
            "max_s": round(float(a.max()), 4), "mean_s": round(float(a.mean()), 4)}


def serve(decoder: str | None, conn, sample_every: float) -> None:
    """The server process: the app on a Workbench (on a tiny random decoder built in a temporary
    folder when `decoder` is None), instrumented. It answers commands on `conn`: "mark" (the measured phase
    starts), "stats" (probe + RSS since the mark), "stop". A separate process, so the RSS measured
    is the app's alone, not the clients'."""
    from cacheaug_core import app
    from cacheaug_core.workbench import Workbench

    work = Path(tempfile.mkdtemp(prefix="cacheaug-load-"))
    if not decoder:
        from tests.conftest import save_tiny_decoder

        decoder = save_tiny_decoder(work / "decoder", "llama")
    wb = Workbench.load(decoder=decoder)
    probe = ConcurrencyProbe()
    probe.wrap(wb)
    demo = app.build_demo(wb)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    sampler = RssSampler(sample_every)
    sampler.start()
    conn.send({"url": url, "pid": os.getpid()})
    mark = time.perf_counter()
    try:
        while True:
            if not conn.poll(600):          # the parent is gone or stuck: end by ourselves
                break
            cmd = conn.recv()
            if cmd == "mark":
                with probe.lock:
                    probe.max, probe.calls, probe.busy_s = 0, 0, 0.0
                mark = time.perf_counter()
                conn.send(psutil.Process().memory_info().rss)
            elif cmd == "stats":
                conn.send({"max": probe.max, "calls": probe.calls, "busy_s": probe.busy_s,
                           "rss": [r for t, r in list(sampler.samples) if t >= mark]})
            else:
                break
    finally:
        sampler.stop.set()
        demo.close()
        shutil.rmtree(work, ignore_errors=True)


def run(clients: int = 16, requests: int = 10, seed: int = 0, decoder: str | None = None,
        sample_every: float = 0.2, burst: int = 0) -> dict:
    """Serve the app in a child process, run the clients here, return the measurements.
    `burst` > 0 adds a last phase: that many requests submitted at once, more than the queue holds."""
    import multiprocessing as mp

    from gradio_client import Client

    ctx = mp.get_context("spawn")             # a fresh interpreter: no state copied from this one
    conn, child_conn = ctx.Pipe()
    server = ctx.Process(target=serve, args=(decoder, child_conn, sample_every), daemon=True)
    server.start()
    child_conn.close()                        # ours: without it a dead child would never read as EOF
    t0 = time.time()
    while not conn.poll(1):
        if not server.is_alive() or time.time() - t0 > 300:
            server.terminate()
            raise RuntimeError(f"the app process did not start (exit code {server.exitcode})")
    url = conn.recv()["url"]
    inflight = {"now": 0, "max": 0}
    lock = threading.Lock()

    def call(client, endpoint, args):
        with lock:
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
        t0 = time.perf_counter()
        try:
            out = client.submit(*args, api_name=endpoint).result(timeout=REQUEST_TIMEOUT_S)
            check_result(endpoint, out)
            return time.perf_counter() - t0, None
        except Exception as e:  # noqa: BLE001 - every failure is recorded, none stops the run
            return time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            with lock:
                inflight["now"] -= 1

    def command(cmd):
        conn.send(cmd)
        if not conn.poll(60):
            raise RuntimeError(f"the app process did not answer {cmd!r}")
        return conn.recv()

    burst_result = None
    try:
        rss_before_warmup = command("mark")
        # Warm-up, not measured: one request per endpoint (lazy imports, first allocations), then one
        # concurrent request per client (the server's worker threads get their memory pools).
        rng = np.random.default_rng(seed + 10_000)
        warm = Client(url, verbose=False, download_files=False)
        warmup_errors = [err for e in ENDPOINTS for _, err in [call(warm, e, request_args(e, rng))] if err]
        with ThreadPoolExecutor(clients) as pool:
            conns = list(pool.map(lambda i: Client(url, verbose=False, download_files=False), range(clients)))
            # /token_detail reads its session's last analysis: one /analyze per client first, so a
            # client whose cycle starts there has a token to pick.
            warmup_errors += [err for _, err in pool.map(
                lambda c: call(c, "/analyze", request_args("/analyze", np.random.default_rng(seed))), conns) if err]
            warmup_errors += [err for _, err in pool.map(
                lambda i: call(conns[i], ENDPOINTS[i % len(ENDPOINTS)],
                               request_args(ENDPOINTS[i % len(ENDPOINTS)], np.random.default_rng(seed + 500 + i))),
                range(clients)) if err]
        inflight["max"] = 0
        rss_start = command("mark")
        t_start = time.perf_counter()

        def client_loop(i: int) -> list[tuple[str, float, str | None]]:
            r = np.random.default_rng(seed + i)
            done = []
            for j in range(requests):                # bounded: exactly `requests` calls
                endpoint = ENDPOINTS[(i + j) % len(ENDPOINTS)]  # every client cycles through all endpoints
                dt, err = call(conns[i], endpoint, request_args(endpoint, r))
                done.append((endpoint, dt, err))
            return done

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(client_loop, range(clients)))
        wall = time.perf_counter() - t_start
        time.sleep(2 * sample_every)                 # one more RSS sample after the last request
        stats = command("stats")

        if burst > 0:
            # More requests at once than the queue holds (max_size 32): the surplus must be refused
            # with "Queue is full", the rest served, and still one model call at a time.
            bc = Client(url, verbose=False, download_files=False, max_workers=burst)
            r = np.random.default_rng(seed + 20_000)
            bc.predict(_text(r, 10), "once", 4, 4, 1, 5, api_name="/analyze")   # what /token_detail reads
            command("mark")
            jobs = [bc.submit(*request_args("/token_detail", r), api_name="/token_detail") for _ in range(burst)]
            outcome = {"submitted": burst, "served": 0, "refused_queue_full": 0, "other_errors": 0, "examples": []}
            for job in jobs:
                try:
                    check_result("/token_detail", job.result(timeout=REQUEST_TIMEOUT_S))
                    outcome["served"] += 1
                except Exception as e:  # noqa: BLE001
                    key = "refused_queue_full" if "queue is full" in str(e).lower() else "other_errors"
                    outcome[key] += 1
                    if key == "other_errors" and len(outcome["examples"]) < 5:
                        outcome["examples"].append(f"{type(e).__name__}: {str(e)[:200]}")
            outcome["max_model_calls_running_at_once"] = command("stats")["max"]
            burst_result = outcome
    finally:
        try:
            conn.send("stop")
        except OSError:
            pass
        server.join(60)
        if server.is_alive():
            server.terminate()

    lat: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    errors: list[dict] = []
    for i, done in enumerate(results):
        for endpoint, dt, err in done:
            lat[endpoint].append(dt)
            if err:
                errors.append({"client": i, "endpoint": endpoint, "error": err})
    rss = stats["rss"] or [rss_start]
    mib = 2 ** 20
    total = sum(len(v) for v in lat.values())
    mid = rss[len(rss) // 2]
    return {
        "clients": clients, "requests_per_client": requests, "requests": total,
        "errors": len(errors), "error_examples": errors[:10], "warmup_errors": warmup_errors,
        "wall_s": round(wall, 2), "throughput_req_per_s": round(total / wall, 2),
        "latency_all": _pct([x for v in lat.values() for x in v]),
        "latency_by_endpoint": {e: _pct(v) for e, v in lat.items()},
        "queue": {"concurrency_limit_model_events": 1, "queue_max_size": 32,
                  "max_model_calls_running_at_once": stats["max"], "model_calls": stats["calls"],
                  "max_requests_in_flight_client_side": inflight["max"],
                  # the model was busy this fraction of the wall time; the rest of the latency is queue wait
                  "model_busy_s": round(stats["busy_s"], 2), "model_busy_fraction": round(stats["busy_s"] / wall, 3),
                  "mean_model_time_per_request_s": round(stats["busy_s"] / max(total, 1), 4)},
        "burst": burst_result,
        "server_rss_mib": {"before_warmup": round(rss_before_warmup / mib, 1), "start": round(rss_start / mib, 1),
                           "middle": round(mid / mib, 1), "end": round(rss[-1] / mib, 1),
                           "peak": round(max(rss) / mib, 1),
                           "growth_start_to_end": round((rss[-1] - rss_start) / mib, 1),
                           "growth_middle_to_end": round((rss[-1] - mid) / mib, 1),
                           "samples": len(rss), "sample_every_s": sample_every,
                           "series": [round(rss[int(k * (len(rss) - 1) / 19)] / mib, 1) for k in range(20)]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=10, help="requests per client")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoder", default="", help="decoder folder (default: a tiny random Llama, built here)")
    ap.add_argument("--sample-every", type=float, default=0.2, help="RSS sampling period (s)")
    ap.add_argument("--burst", type=int, default=40, help="requests submitted at once after the main phase "
                    "(more than the queue's 32 places; 0 = skip)")
    ap.add_argument("--out", default=str(ROOT / "results" / "load_test.json"))
    args = ap.parse_args(argv)
    from importlib.metadata import version

    t0 = time.time()
    res = run(args.clients, args.requests, args.seed, args.decoder or None, args.sample_every, args.burst)
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain") else "")
    out = {"command": " ".join(["python", "bench/load_test.py"] + (argv if argv is not None else sys.argv[1:])),
           "commit": commit, "device": f"cpu, {os.cpu_count()} cores",
           "note": "the cores are shared with other work, so latencies are indicative",
           "decoder": args.decoder or "tiny random Llama (2 layers, hidden 32, byte tokenizer)",
           "torch": version("torch"), "gradio": version("gradio"), "total_runtime_s": round(time.time() - t0, 1),
           **res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    q, r, la = res["queue"], res["server_rss_mib"], res["latency_all"]
    print(f"{res['requests']} requests from {res['clients']} clients in {res['wall_s']} s; errors {res['errors']}; "
          f"latency p50 {la['p50_s']} s p95 {la['p95_s']} s; max model calls at once {q['max_model_calls_running_at_once']}; "
          f"RSS start/middle/end/peak {r['start']}/{r['middle']}/{r['end']}/{r['peak']} MiB -> {args.out}")
    b = res["burst"]
    if b:
        print(f"burst of {b['submitted']}: {b['served']} served, {b['refused_queue_full']} refused (queue full), "
              f"{b['other_errors']} other errors; max model calls at once {b['max_model_calls_running_at_once']}")
    ok = res["errors"] == 0 and q["max_model_calls_running_at_once"] <= 1
    ok = ok and (not b or (b["other_errors"] == 0 and b["max_model_calls_running_at_once"] <= 1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
