#!/usr/bin/env bash
# The latent-count sweep on one GPU (run there, after `source scripts/gpu_remote.sh`): every arm trains
# in its own process, all at once on the one GPU, with the same data (R/pack), steps, batch, schedule
# and layout (configs/smollm2_default.yaml); only the number of latents and the body differ. Each
# coprocessor arm nlN has a pause-token arm pN with the same N (`--body none`, the paper's Table 3
# control), trained with the same budget.
#
#   bash scripts/gpu_sweep.sh start STEPS [ARMS]   # detached (setsid): returns at once; logs in R/sweep/
#   bash scripts/gpu_sweep.sh status               # one line per arm: its last progress line
#   bash scripts/gpu_sweep.sh wait MINUTES         # wait until every arm is done or MINUTES pass
#   bash scripts/gpu_sweep.sh collect [FILES...]   # every arm's metrics.jsonl and log tail (+ FILES) in $OUT/sweep.tgz
#
# ARMS defaults to "nl8 nl16 nl32 nl64 p8 p16 p32 p64". Checkpoints stay in R/sweep/<arm>/last (a
# compact coprocessor is ~55 MB in bf16: score them there with `cacheaug eval ppl`, see
# docs/ablations.md for the commands used).
set -uo pipefail
R=${CACHEAUG_REMOTE:-/tmp/cacheaug}
S=$R/sweep
cmd=${1:?start|status|wait|collect}; shift
arms_default="nl8 nl16 nl32 nl64 p8 p16 p32 p64"

flags_of() {   # the flags that make an arm what it is
  local arm=$1 n=${1#nl}
  case "$arm" in
    nl*) echo "--num-latents $n" ;;
    p*) n=${arm#p}; echo "--num-latents $n --body none --num-layers 0 --lr 1e-3 --soft-lr-mult 1" ;;
    *) echo "unknown arm $arm" >&2; return 1 ;;
  esac
}

case "$cmd" in
  start)
    steps=${1:?STEPS}; arms=${2:-$arms_default}
    mkdir -p "$S"
    for arm in $arms; do
      f=$(flags_of "$arm") || exit 2
      # shellcheck disable=SC2086
      setsid nohup python -m cacheaug_core.cli train --config configs/smollm2_default.yaml --data "$R/pack" \
        --out-dir "$S/$arm" --steps "$steps" --batch-size 32 --grad-accum 2 --fast --eval-every 100 \
        --eval-batches 2 --save-every 100000 --log-every 25 --seed 0 ${SWEEP_EXTRA:-} $f \
        > "$S/$arm.log" 2>&1 < /dev/null &
      echo "started $arm: $f"
    done ;;
  status)
    for log in "$S"/*.log; do
      printf '%s: %s\n' "$(basename "$log" .log)" "$(tail -c 400 "$log" | tr '\r' '\n' | grep -v '^\s*$' | tail -1 | cut -c1-150)"
    done ;;
  wait)
    end=$(( $(date +%s) + ${1:?MINUTES} * 60 ))
    while [ "$(date +%s)" -lt "$end" ]; do
      pgrep -f "cacheaug_core.cli train" >/dev/null || break
      sleep 15
    done
    bash "$0" status ;;
  collect)   # one file back: $OUT takes few files
    tmp=$(mktemp -d)
    for d in "$S"/*/; do
      arm=$(basename "$d")
      cp "$d/metrics.jsonl" "$tmp/${arm}_metrics.jsonl" 2>/dev/null
      tail -c 3000 "$S/$arm.log" | tr '\r' '\n' > "$tmp/$arm.log.tail"
    done
    [ $# -gt 0 ] && cp "$@" "$tmp/"
    tar czf "$OUT/sweep.tgz" -C "$tmp" . ;;
esac
