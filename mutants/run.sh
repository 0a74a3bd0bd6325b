#!/usr/bin/env bash
# Mutation testing over the registry and the glue's library (not the
# binaries under cuda-glue/src/bin), judged by the workspace's own tests.
# Not a CI stage: a full run is hours on 2 cores. Run it on the files a
# change touches:
#
#   bash mutants/run.sh [-j SHARDS] [-o OUT] [FILE...]     (default: every file in scope)
#
# Each shard runs to the end or says it did not; mutants/summarize.py turns
# the outcomes into the per-shard table of mutants/RECORD.md. Equivalent
# mutants, one line of reason each, are in mutants/EQUIVALENT.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
shards=1 out=$root/target/mutants
while getopts "j:o:" o; do
  case $o in j) shards=$OPTARG ;; o) out=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  mapfile -t files < <(git ls-files 'registry/src/*.rs' 'cuda-glue/src/*.rs' | grep -v '^cuda-glue/src/bin/')
fi
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done
mkdir -p "$out"
for ((k = 0; k < shards; k++)); do
  dir=$out/shard-$k
  start=$(date +%s)
  set +e
  cargo mutants --test-workspace=true --timeout 120 --minimum-test-timeout 30 \
      --shard "$k/$shards" --output "$dir" "${args[@]}" 2>&1 | tail -5
  rc=${PIPESTATUS[0]}
  set -e
  # 0: all caught; 2: some missed; 3: some timed out; anything else: the run broke.
  echo "shard $k/$shards: exit $rc after $(( $(date +%s) - start )) s -> $dir/mutants.out"
done
python3 "$root/mutants/summarize.py" "$out"
