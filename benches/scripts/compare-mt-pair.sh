#!/usr/bin/env bash
# Runs the read-mostly and churn-heavy mixes of two builds of `mt`
# (package-mt-pair.sh) alternately, ROUNDS times each, registry beside raw
# SkipMap, so that both commits meet the same machine state.
#
#   compare-mt-pair.sh [ROUNDS] [OUT]    (env: SEGREG_MT_THREADS, SEGREG_MT_SIZES, SEGREG_MT_SECS)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rounds=${1:-3}
out=${2:-$here/pair-results}
mkdir -p "$out"
export SEGREG_MT_IMPLS=registry,raw-skipmap SEGREG_MT_ONLY=throughput
export SEGREG_MT_THREADS=${SEGREG_MT_THREADS:-16} SEGREG_MT_SIZES=${SEGREG_MT_SIZES:-1000,100000}
export SEGREG_MT_SECS=${SEGREG_MT_SECS:-2}
for r in $(seq 1 "$rounds"); do
  for side in old new; do
    mkdir -p "$out/$side-$r"
    SEGREG_BENCH_OUT="$out/$side-$r" "$here/mt-$side" --bench 2>&1 | sed "s/^/[$side round $r] /"
  done
done
