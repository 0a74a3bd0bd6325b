#!/usr/bin/env bash
# Builds the package's wheel (release, abi3: CPython 3.11 and later) into
# .whl/ at the repository root, for a GPU host without Rust
# (python/gpu/run-on-device.sh installs it there). .whl/ is not committed
# (add `/.whl/` to .git/info/exclude).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=$root/target/py-venv
[ -x "$venv/bin/maturin" ] || { echo "run bash scripts/test-all.sh --python first (it makes $venv)"; exit 1; }
rm -rf "$root/.whl"
CARGO_TARGET_DIR=$root/target/python "$venv/bin/maturin" build --release --locked \
  -m "$root/python/Cargo.toml" -o "$root/.whl" -i "$venv/bin/python"
ls -la "$root/.whl"
