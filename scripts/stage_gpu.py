#!/usr/bin/env python
"""Stage large files (the model GGUF, corpus token shards) onto the GPU machine, one chunk per call.

A call to the GPU machine carries at most 64 MiB (the checkout plus the ignored paths named in
`carry`), and files written outside the checkout survive only while the machine stays warm. So the
files are packed into one deterministic tar, cut into chunks of at most 55 MiB under the ignored
folder `.gpu/stage-<id>/`, and sent in consecutive calls:

    python scripts/stage_gpu.py --model --corpus data/corpus            # pack, cut, print the plan
    python scripts/stage_gpu.py --model --corpus data/corpus --json     # the plan as JSON
    python scripts/stage_gpu.py data/extra.bin --chunk-mib 40           # any files

For every chunk the plan prints the `carry` path and the remote bash command (run in the checkout
root on the GPU machine). Call k copies chunk k to /tmp/cacheaug/stage/ and checks its sha256; the
last call also joins the chunks, checks the sha256 of the whole tar and unpacks it, so that every
file lands at /tmp/cacheaug/<its path relative to the repository> (the GGUF at
/tmp/cacheaug/model/<name>.gguf). A chunk already present with the right sha256 is not copied
again, and the final command fails loudly (exit 3) if a chunk is missing, so a machine that went
back between calls is noticed: start again from call 1.

The remote side is nothing but this bash, shown for a 2-chunk bundle:

    mkdir -p /tmp/cacheaug/stage && cd /tmp/cacheaug/stage && \\
      (echo "<sha-of-part-00>  part-00" | sha256sum -c --quiet >/dev/null 2>&1 || cp "$OLDPWD/.gpu/stage-ID/part-00" .) && \\
      echo "<sha-of-part-00>  part-00" | sha256sum -c --quiet
    ... last call: the same for part-01, then
      cat part-00 part-01 > bundle.tar && echo "<sha-of-bundle>  bundle.tar" | sha256sum -c --quiet && \\
      tar xf bundle.tar -C /tmp/cacheaug && rm bundle.tar && ls -la /tmp/cacheaug
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REMOTE = "/tmp/cacheaug"
CHUNK_MIB = 55




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


def arcname(p: Path) -> str:
    p = p.resolve()
    if p.suffix == ".gguf":
        return f"model/{p.name}"
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return f"files/{p.name}"


def pack(files: list[Path], chunk_mib: int = CHUNK_MIB) -> dict:
    """Deterministic tar of `files` cut into chunks under .gpu/stage-<id>/; returns the plan."""
    tmp = ROOT / ".gpu" / "stage-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bundle = tmp / "bundle.tar"
    with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tf:
        for f in sorted(set(files), key=arcname):
            info = tf.gettarinfo(str(f), arcname=arcname(f))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(f, "rb") as fh:
                tf.addfile(info, fh)
    sys.path.insert(0, str(ROOT))
    from cacheaug_core.decoder import sha256_file

    digest = sha256_file(bundle)
    out = ROOT / ".gpu" / f"stage-{digest[:12]}"
    if out.exists() and (out / "plan.json").exists():
        shutil.rmtree(tmp)
        return json.loads((out / "plan.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    limit = chunk_mib * 1024 * 1024
    parts = []
    with open(bundle, "rb") as f:
        while block := f.read(limit):
            p = out / f"part-{len(parts):02d}"
            p.write_bytes(block)
            parts.append({"path": str(p.relative_to(ROOT)), "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    shutil.rmtree(tmp)
    plan = {"id": digest[:12], "bundle_sha256": digest, "remote_dir": REMOTE,
            "files": [arcname(f) for f in sorted(set(files), key=arcname)],
            "bytes": sum(p["bytes"] for p in parts), "parts": parts}
    plan["calls"] = remote_calls(plan)
    (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def remote_calls(plan: dict) -> list[dict]:
    """One {carry, command} per call; run them back to back on the same warm machine."""
    calls = []
    names = [Path(p["path"]).name for p in plan["parts"]]
    for i, part in enumerate(plan["parts"]):
        name = names[i]
        check = f'echo "{part["sha256"]}  {name}" | sha256sum -c --quiet'
        cmd = (f'mkdir -p {REMOTE}/stage && cd {REMOTE}/stage && '
               f'({check} >/dev/null 2>&1 || cp "$OLDPWD/{part["path"]}" .) && {check}')
        if i == len(plan["parts"]) - 1:
            have = " && ".join(f"test -f {n}" for n in names)
            cmd += (f' && ({have} || {{ echo "missing chunks: the machine was reset, start again from call 1"; exit 3; }})'
                    f' && cat {" ".join(names)} > bundle.tar'
                    f' && echo "{plan["bundle_sha256"]}  bundle.tar" | sha256sum -c --quiet'
                    f' && tar xf bundle.tar -C {REMOTE} && rm -f bundle.tar {" ".join(names)}'
                    f' && echo "staged {len(plan["files"])} files into {REMOTE}" && du -sh {REMOTE}')
        calls.append({"carry": [part["path"]], "command": cmd})
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="extra files to stage")
    ap.add_argument("--model", action="store_true", help="include the default decoder GGUF (93.8 MiB)")
    ap.add_argument("--corpus", type=Path, default=None, help="include a built corpus folder (manifest + shards + held-out)")
    ap.add_argument("--no-heldout", action="store_true", help="with --corpus: training shards only")
    ap.add_argument("--chunk-mib", type=int, default=CHUNK_MIB, help="largest chunk per call, MiB (default 55)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    files = [f.resolve() for f in args.files]
    if args.model:
        files.append(model_file())
    if args.corpus:
        files += corpus_files(args.corpus.resolve(), heldout=not args.no_heldout)
    if not files:
        ap.error("nothing to stage: name files, --model or --corpus")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        ap.error(f"missing: {missing[:5]}")
    plan = pack(files, args.chunk_mib)
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0
    print(f"bundle {plan['id']}: {len(plan['files'])} files, {plan['bytes'] / 2**20:.1f} MiB in {len(plan['parts'])} calls;"
          f" files land under {REMOTE}/")
    for i, call in enumerate(plan["calls"]):
        print(f"\n# call {i + 1}/{len(plan['calls'])}  carry={json.dumps(call['carry'])}\n{call['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
