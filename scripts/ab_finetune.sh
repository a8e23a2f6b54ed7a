#!/usr/bin/env bash
# Before/after on the finetune CLI itself: the same flags with two checkouts' packages, interleaved.
#
#   scripts/ab_finetune.sh /path/to/old/src src            # 3 rounds, checkpointing and not
#   RUNS=5 scripts/ab_finetune.sh /path/to/old/src src
#
# Each measurement runs `finetune` on SmolLM2 (the demo model) and tests/data/text/shakespeare.txt at
# ctx 256, batch 1, 2 threads, for 4 and for 14 iterations in fresh folders; the difference over 10 is
# the time of one iteration without start-up.  Run it on a warm kernel cache (a run of each first).
# The bench scripts' own harnesses differ between checkouts; this compares what a user runs.
set -euo pipefail
shopt -s inherit_errexit  # a failed run inside $(...) stops the script
before=$(realpath "$1"); after=$(realpath "$2"); runs=${RUNS:-3}
repo=$(cd "$(dirname "$0")/.." && pwd)
data=$repo/tests/data/text/shakespeare.txt
model=$(PYTHONPATH=$after python -m gguf_finetune demo-model)
wall() {  # src iterations flags... -> seconds
  local src=$1 n=$2; shift 2
  local w; w=$(mktemp -d)
  local t0; t0=$(date +%s.%N)
  if ! (cd "$w" && PYTHONPATH=$src python -m gguf_finetune finetune --model-base "$model" --train-data "$data" \
       --ctx 256 --batch 1 --adam-iter "$n" --threads 2 --save-every 0 --no-progress "$@" > log.txt 2>&1); then
    echo "ab_finetune: finetune failed with $src:" >&2; tail -3 "$w/log.txt" >&2; rm -rf "$w"; exit 1
  fi
  local t1; t1=$(date +%s.%N)
  rm -rf "$w"
  python -c "print(f'{$t1 - $t0:.3f}')"
}
for mode in "" "--no-checkpointing"; do
  for r in $(seq "$runs"); do
    for side in before after; do
      src=$before; [ "$side" = after ] && src=$after
      a=$(wall "$src" 4 $mode); b=$(wall "$src" 14 $mode)
      python -c "print('$side ${mode:-checkpointing} round $r: ' + f'{($b - $a) * 100:.0f} ms per iteration')"
    done
  done
done
