#!/usr/bin/env bash
# The latent-count sweep on one GPU (run there, after `source scripts/gpu_remote.sh`): every arm trains
# in its own process, all at once on the one GPU, with the same data (R/pack), steps, batch, schedule
# and layout (configs/smollm2_default.yaml); only the number of latents and the body differ. Each
# coprocessor arm nlN has a pause-token arm pN with the same N (`--body none`, the paper's Table 3
# control), trained with the same budget.
#
#   [PARALLEL=4] bash scripts/gpu_sweep.sh start STEPS [ARMS]   # detached (setsid): returns at once; logs in R/sweep/
#   bash scripts/gpu_sweep.sh status               # one line per arm: its last progress line
#   bash scripts/gpu_sweep.sh wait MINUTES         # wait until every arm is done or MINUTES pass
#   [TOKENS=12000] bash scripts/gpu_sweep.sh eval [N...]   # dev-set eval ppl of nlN against pN (default 8 16 32 64),
#                                                  # side by side, detached; results in R/res/sweep_nlN.json
#   bash scripts/gpu_sweep.sh collect [FILES...]   # every arm's metrics.jsonl and log tail (+ FILES) in $OUT/sweep.tgz
#
# PARALLEL arms train at a time (the rest queue): eight arms at once at batch 16 filled an H100's
# 80 GB together with five evaluation processes and one arm ran out of memory. Allocations use
# expandable segments (less fragmentation when several processes share the GPU).
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
    for arm in $arms; do flags_of "$arm" >/dev/null || exit 2; done
    # a queue of arms, PARALLEL at a time, in one detached process group
    printf '%s\n' $arms | setsid nohup xargs -P "${PARALLEL:-4}" -I{} bash "$0" run-arm {} "$steps" \
      > "$S/queue.log" 2>&1 &
    sleep 2   # the queue's first arms are up before a `wait` right after this looks for them
    echo "queued: $arms (${PARALLEL:-4} at a time)" ;;
  run-arm)   # one arm in the foreground (the queue's worker)
    arm=$1 steps=$2
    f=$(flags_of "$arm") || exit 2
    # shellcheck disable=SC2086
    PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} \
      python -m cacheaug_core.cli train --config configs/smollm2_default.yaml --data "$R/pack" \
      --out-dir "$S/$arm" --steps "$steps" --batch-size 32 --grad-accum 2 --fast --eval-every 100 \
      --eval-batches 2 --save-every 100000 --log-every 25 --seed 0 ${SWEEP_EXTRA:-} $f \
      > "$S/$arm.log" 2>&1 < /dev/null
    echo "$arm done: exit $?" ;;
  eval)
    mkdir -p "$R/res"
    for n in ${*:-8 16 32 64}; do
      c=""; [ -f "$S/p$n/last/config.json" ] && c="--compare $S/p$n/last"
      # shellcheck disable=SC2086
      setsid nohup python -m cacheaug_core.cli eval ppl --text data/corpus/heldout/dev.jsonl \
        --json "$R/res/sweep_nl$n.json" --coprocessor "$S/nl$n/last" $c --positions 32 \
        --max-tokens "${TOKENS:-12000}" --device cuda --dtype bfloat16 --points-per-pass 64 --no-progress \
        > "$R/res/sweep_nl$n.log" 2>&1 < /dev/null &
      echo "eval nl$n ${c:-(no pause arm)}"
    done ;;
  status)
    for log in "$S"/*.log; do
      printf '%s: %s\n' "$(basename "$log" .log)" "$(tail -c 400 "$log" | tr '\r' '\n' | grep -v '^\s*$' | tail -1 | cut -c1-150)"
    done ;;
  wait)
    end=$(( $(date +%s) + ${1:?MINUTES} * 60 ))
    while [ "$(date +%s)" -lt "$end" ]; do
      # an arm training, or the queue still holding arms ([m]: the pattern never matches this shell's own line)
      pgrep -f "cacheaug_core.cli trai[n]" >/dev/null || pgrep -f "gpu_sweep.sh run-ar[m]" >/dev/null || break
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
