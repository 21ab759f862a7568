#!/usr/bin/env bash
# Set up (ci/setup.sh) and run the whole test suite. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/ruff check src tests bench
# The wheel users install (dist/); tests/test_wheel.py installs it into a fresh venv.
bash ci/build-wheel.sh
exec .venv/bin/python -m pytest -q "$@"
