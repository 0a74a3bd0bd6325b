#!/usr/bin/env bash
# Runs every benchmark from the folder this script is in (as made by
# package.sh) on a machine that needs no Rust, then bench-report.
#
#   run-all.sh [RESULTS_DIR]        (default: ./results beside this script)
#
# Environment (all optional):
#   MACHINE            label of the RESULTS.md section   (default "N-core machine")
#   WARM, MEAS         criterion warm-up / measurement s (default 1 and 2)
#   SEGREG_MT_SECS     seconds per multi-thread point     (default 1)
#   SEGREG_MT_THREADS  thread counts, e.g. 1,2,4,8,16     (default 1,2,4,8,16)
#   SEGREG_MT_SIZES    live-segment counts                (default 1000,100000)
#   SEGREG_MT_WINDOW_SIZES, SEGREG_MT_WINDOW_THREADS
#                      window-lookup points  (default 25,1000,100000 and 1,16)
#   SEGREG_MT_ONLY     throughput or window_of: one part of mt only
#   QUICK=1            one quick iteration of everything (smoke test)
#   STEPS              which steps, in order (default "memory mt st report")
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here/results}" && cd "${1:-$here/results}" && pwd)
export CRITERION_HOME="$out/criterion" SEGREG_BENCH_OUT="$out"
machine=${MACHINE:-"$(nproc)-core machine"}
mode=--bench
[ "${QUICK:-0}" = 1 ] && mode=--test
for step in ${STEPS:-memory mt st report}; do
    start=$(date +%s)
    case $step in
        memory) "$here/memory" "$mode" ;;
        mt) "$here/mt" "$mode" ;;
        st) "$here/st" "$mode" --warm-up-time "${WARM:-1}" --measurement-time "${MEAS:-2}" ;;
        report)
            [ "$mode" = --bench ] && "$here/bench-report" --machine "$machine" \
                --criterion "$CRITERION_HOME" --results "$out" \
                --note "criterion --warm-up-time ${WARM:-1} --measurement-time ${MEAS:-2}, SEGREG_MT_SECS=${SEGREG_MT_SECS:-1}" \
                --out "$out/RESULTS-section.md" ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
    echo "step $step took $(( $(date +%s) - start )) s"
done
