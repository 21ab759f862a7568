#!/usr/bin/env bash
# The main job on a fresh machine: set up everything, then run a podman container
# lazily from a local registry through soci-store and report the bytes fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
exec .venv/bin/python ci/demo.py
