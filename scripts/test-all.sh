#!/usr/bin/env bash
# The README's test command: the Rust tests, then the Python package built
# from source into a virtual environment under target/ and its tests.
#
#   bash scripts/test-all.sh            # everything
#   bash scripts/test-all.sh --python   # the Python part only
#
# Needs Rust, Python 3.11+ and a C compiler; no GPU. The Python tools are
# pinned here, and installed from PyPI into the virtual environment only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
MATURIN=maturin==1.16.0
PYTEST=pytest==9.2.0
MYPY=mypy==2.4.1
venv=$root/target/py-venv
py=$venv/bin/python

section() { echo; echo "--- $*"; }

if [ "${1:-}" != "--python" ]; then
  section "cargo test"
  cargo test --locked
fi

section "virtual environment ($venv)"
[ -x "$py" ] || python3 -m venv "$venv"
"$py" -m pip install --quiet --disable-pip-version-check "$MATURIN" "$PYTEST" "$MYPY"

section "pip install ./python"
# No build isolation: the build uses the pinned maturin above. The
# extension's Rust build has a target directory of its own.
CARGO_TARGET_DIR=$root/target/python "$py" -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --force-reinstall --no-deps ./python

section "mypy --strict"
# The package's sources (the extension through its stubs, _native.pyi) and
# the tests.
(cd python && "$py" -m mypy --strict --python-version 3.11 segment_registry tests)

section "pytest"
# The standalone C library too: the one-state test loads it beside the
# package's own.
cargo build --locked --quiet -p segment-registry-nccl --lib
export SEGREG_CDYLIB=$root/target/debug/libsegment_registry_nccl.so
# From a folder without the sources, so the installed package is tested.
(cd "$root/target" && "$py" -m pytest -v -p no:cacheprovider "$root/python/tests")
