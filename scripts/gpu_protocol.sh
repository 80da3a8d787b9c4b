#!/usr/bin/env bash
# The evaluation protocol (docs/evaluation.md) on the GPU machine, after `source scripts/gpu_remote.sh`:
# `eval ppl` of one coprocessor against the decoder, a pause-token checkpoint and as many plain extra
# keys as it has latents, on held-out sets, each set in its own detached process (one small model
# leaves an H100 mostly idle, so the sets share it).
#
#   [POSITIONS=32] [PPP=64] bash scripts/gpu_protocol.sh start NAME COPROCESSOR PAUSE MAX_TOKENS SET...   # detached
#   bash scripts/gpu_protocol.sh wait MINUTES                                      # until all are done
#
# Results: R/res/ppl_<set>_<NAME>.json (R = $CACHEAUG_REMOTE); logs next to them.
set -uo pipefail
R=${CACHEAUG_REMOTE:-/tmp/cacheaug}
mkdir -p "$R/res"
case "${1:?start|wait}" in
  start)
    name=$2 cop=$3 pause=$4 max=$5; shift 5
    for set in "$@"; do
      setsid nohup python -m cacheaug_core.cli eval ppl --text "data/corpus/heldout/$set.jsonl" \
        --json "$R/res/ppl_${set}_${name}.json" --coprocessor "$cop" --compare "$pause" --extra-keys match \
        --positions "${POSITIONS:-32}" --max-tokens "$max" --device cuda --dtype bfloat16 --points-per-pass "${PPP:-64}" --no-progress \
        > "$R/res/ppl_${set}_${name}.log" 2>&1 < /dev/null &
      echo "started $set ($name)"
    done ;;
  wait)
    end=$(( $(date +%s) + ${2:?MINUTES} * 60 ))
    while [ "$(date +%s)" -lt "$end" ] && pgrep -f "cli eval ppl" >/dev/null; do sleep 10; done
    ls -la "$R/res" ;;
esac
