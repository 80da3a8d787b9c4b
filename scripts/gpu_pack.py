"""Make a training pack of a built corpus for a GPU machine that has no registry access.

    python scripts/gpu_pack.py --corpus data/corpus --out .gpu/pack --tokens 60_000_000 --piece-mib 30

Draws windows from the corpus with its mixture weights (the same sampler training uses), writes
them as flat uint16 pieces `train_000.bin`, `train_001.bin`, ... of at most --piece-mib each, the
dev held-out set as `heldout.bin` (monitored during training, never trained on) and `pack.json` with
sha256 sums. `cacheaug train --data PACK_DIR` reads such a folder (train.PackData).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from cacheaug_core import sources as S
from cacheaug_core.data import TokenData


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--out", default=".gpu/pack")
    ap.add_argument("--tokens", type=int, default=60_000_000, help="training tokens in the pack")
    ap.add_argument("--window", type=int, default=2048, help="tokens per drawn window")
    ap.add_argument("--piece-mib", type=float, default=30.0)
    ap.add_argument("--heldout", default="dev", help="held-out set stored as heldout.bin (the dev set: never a headline set)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    if S.HELDOUT_SETS.get(args.heldout, S.HELDOUT_SETS["dev"]).role == "headline":
        ap.error(f"--heldout {args.heldout} is a headline set: training monitors the dev set, and nothing is chosen on a headline set")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = TokenData(args.corpus, "train")
    g = torch.Generator().manual_seed(args.seed)
    per_piece = int(args.piece_mib * 2**20 // 2 // args.window)                # windows per piece
    n_windows = args.tokens // args.window
    pieces, i = [], 0
    while i < n_windows:
        n = min(per_piece, n_windows - i)
        arr = data.sample(n, args.window, g).numpy().astype(np.uint16)
        f = out / f"train_{len(pieces):03d}.bin"
        arr.tofile(f)
        pieces.append({"file": f.name, "tokens": int(arr.size), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
        i += n
        print(f"{f}: {arr.size:,} tokens", flush=True)
    src = Path(args.corpus) / "heldout" / f"{args.heldout}.bin"
    shutil.copy(src, out / "heldout.bin")
    meta = {"corpus": str(args.corpus), "manifest_mix": data.weights, "window": args.window, "seed": args.seed,
            "pieces": pieces, "heldout": {"set": args.heldout, "tokens": (out / "heldout.bin").stat().st_size // 2,
                                          "sha256": hashlib.sha256((out / "heldout.bin").read_bytes()).hexdigest()}}
    (out / "pack.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: v for k, v in meta.items() if k != "pieces"}, indent=1))


if __name__ == "__main__":
    main()
