#!/usr/bin/env bash
# Mutation testing over the registry and the glue's library (not the
# binaries under cuda-glue/src/bin), judged by the workspace's own tests.
# Not a CI stage: a full run is hours on 2 cores. Run it on the files a
# change touches:
#
#   bash mutants/run.sh [-j SHARDS] [-J JOBS] [-o OUT] [-t TIMEOUT] [FILE...]
#
# (default: every file in scope, 1 shard, 2 parallel jobs, TIMEOUT 30 s per
# test run: the glue's suite takes about 6 s under nextest).
#
# Speed: a mutant costs a rebuild of its crate, a relink of its tests and
# the tests' run. The `mutation` profile (Cargo.toml) builds the workspace's
# crates unoptimised without debug info, nextest runs the test binaries in
# parallel, and each job directory starts from a copy of target/ so that
# the dependencies are not built again: about 12 s a mutant per job.
#
# Two stages, so that a run fits in hours rather than days:
#   1. every mutant of a crate's files is judged by that crate's own tests
#      (`--test-package`): a rebuild of one crate and a few seconds of tests;
#   2. the mutants stage 1 missed are judged again by the whole workspace
#      (`--test-workspace=true`: the proptests and the glue's tests count for
#      registry mutants), named one by one with `--re`.
# A mutant caught in stage 1 is caught by the workspace too (its tests are
# part of it), so what stage 2 misses is what the workspace misses.
#
# Each shard runs to the end or says it did not; mutants/summarize.py turns
# the outcomes into the per-shard table of mutants/RECORD.md. Equivalent
# mutants, one line of reason each, are in mutants/EQUIVALENT.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
shards=1 jobs=2 out=$root/target/mutants timeout=30
while getopts "j:J:o:t:" o; do
  case $o in j) shards=$OPTARG ;; J) jobs=$OPTARG ;; o) out=$OPTARG ;; t) timeout=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants@27.1.0
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# The copied target/ must hold the dependencies built with the profile.
cargo test --profile mutation --workspace --no-run >/dev/null
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  mapfile -t files < <(git ls-files 'registry/src/*.rs' 'cuda-glue/src/*.rs' | grep -v '^cuda-glue/src/bin/')
fi
mkdir -p "$out"

# One cargo-mutants run; its exit status says nothing about the shard's end
# (0: all caught; 2: some missed; 3: some timed out), summarize.py does.
mutate() {
  local dir=$1; shift
  local start; start=$(date +%s)
  set +e
  # Test modules (`mod tests` under a cfg cargo-mutants does not read as
  # test-only) are not the product: their mutants are skipped.
  cargo mutants --timeout "$timeout" --minimum-test-timeout 20 --exclude-re '\btests::' \
    --test-tool nextest --profile mutation --jobs "$jobs" --copy-target=true \
    --output "$dir" "$@" 2>&1 | tail -3
  local rc=${PIPESTATUS[0]}
  set -e
  echo "$(basename "$dir"): exit $rc after $(( $(date +%s) - start )) s -> $dir/mutants.out"
}

# Stage 1, per crate.
for crate in registry:segment-registry cuda-glue:segment-registry-nccl; do
  dir=${crate%%:*} pkg=${crate#*:}
  args=()
  for f in "${files[@]}"; do
    [[ $f == "$dir"/* ]] && args+=(--file "$f")
  done
  [ ${#args[@]} -eq 0 ] && continue
  for ((k = 0; k < shards; k++)); do
    mutate "$out/stage1-$dir-shard-$k" --test-package "$pkg" --shard "$k/$shards" "${args[@]}"
  done
done

# Stage 2: the registry's survivors, judged by the workspace. The glue's
# survivors skip it: no other crate of the workspace depends on the glue, so
# the workspace's tests of a glue mutant are the glue's own, already run.
missed=$(cat "$out"/stage1-registry-*/mutants.out/missed.txt 2>/dev/null || true)
if [ -n "$missed" ]; then
  re_args=()
  while IFS= read -r m; do
    # cargo-mutants matches --re against "file:line:col: description".
    re_args+=(--re "^$(printf '%s' "$m" | sed 's/[][\.*^$(){}+?|]/\\&/g')\$")
  done <<<"$missed"
  files_args=()
  for f in "${files[@]}"; do
    [[ $f == registry/* ]] && files_args+=(--file "$f")
  done
  mutate "$out/stage2-workspace" --test-workspace=true "${files_args[@]}" "${re_args[@]}"
fi
python3 "$root/mutants/summarize.py" "$out"
