#!/usr/bin/env bash
# Regenerate the Python stubs of containerd's API from src/soci/containerd/api/*.proto.
# The stubs are committed (a wheel build needs no protoc); run this after editing a .proto
# with grpcio-tools installed (pip install -e ".[dev]").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src \
  src/soci/containerd/api/*.proto
# The tests' CRI image service client (Kubernetes cri-api, package runtime.v1).
"$PY" -m grpc_tools.protoc -I tests --python_out=tests --pyi_out=tests --grpc_python_out=tests \
  tests/cri/api.proto
echo "ci/gen-proto.sh: stubs written to src/soci/containerd/api/ and tests/cri/"
