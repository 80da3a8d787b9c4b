#!/usr/bin/env bash
# One training stint on the GPU machine (run there, after `source scripts/gpu_remote.sh`):
# train NAME for at most MINUTES (resuming if NAME already has a checkpoint in R/runs, R = $CACHEAUG_REMOTE,
# default /tmp/cacheaug; the data is R/pack),
# then export the weights in bf16 to $OUT/NAME (brought back; trainer state stays on the machine).
#
#   bash scripts/gpu_stint.sh NAME MINUTES --config configs/smollm2_default.yaml [more train flags]
set -uo pipefail
name=$1; minutes=$2; shift 2
R=${CACHEAUG_REMOTE:-/tmp/cacheaug}
run=$R/runs/$name
mkdir -p "$R/runs"
resume=""
[ -f "$run/last/trainer_state.json" ] && resume="--resume"
python -m cacheaug_core.cli train --data "$R/pack" --out-dir "$run" --max-minutes "$minutes" $resume "$@" \
  > "$run.log" 2>&1
rc=$?
tail -c 1500 "$run.log" | tr '\r' '\n' | grep -v "^train:" | tail -8
mkdir -p "$OUT/$name"
[ "${EXPORT:-1}" = 1 ] && [ -d "$run/last" ] && python -m cacheaug_core.cli export "$run/last" "$OUT/$name/ckpt" --dtype bf16 >/dev/null
cp "$run/metrics.jsonl" "$OUT/$name/metrics.jsonl" 2>/dev/null
exit $rc
