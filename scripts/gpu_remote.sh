#!/usr/bin/env bash
# Runs ON the GPU machine at the start of every call (source it): moves whatever staged pieces this
# call carried (.gpu/stage*/) into /tmp/cacheaug, which survives between calls while the machine
# stays warm; joins and checks the decoder GGUF once both halves have arrived; installs carried
# wheels (gguf) into /tmp/cacheaug/site; exports the paths cacheaug uses.
#
#   source scripts/gpu_remote.sh && python -m cacheaug_core.cli train --data /tmp/cacheaug/pack ...
S=/tmp/cacheaug
mkdir -p "$S/gguf" "$S/pack" "$S/site" "$S/home" "$S/runs"
for d in .gpu/stage*; do
  [ -d "$d" ] || continue
  for f in "$d"/*; do
    case "$f" in
      *.whl) pip install -q --no-index --no-deps --target "$S/site" "$f" ;;
      */smol.part*) cp "$f" "$S/gguf/" ;;
      */train_*.bin|*/heldout.bin|*/pack.json) cp "$f" "$S/pack/" ;;
      */ckpt.tar) tar -xf "$f" -C "$S/runs" ;;
    esac
  done
done
G="$S/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$G" ] && [ -f "$S/gguf/smol.part00" ] && [ -f "$S/gguf/smol.part01" ]; then
  cat "$S/gguf/smol.part00" "$S/gguf/smol.part01" > "$G"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c
fi
export PYTHONPATH="$PWD:$S/site${PYTHONPATH:+:$PYTHONPATH}" CACHEAUG_HOME="$S/home" CACHEAUG_GGUF="$G"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ls -la "$S/pack" "$S/gguf" | head -30
