#!/usr/bin/env bash
# Build a static, zlib-compatible zlib-ng into .build/zlib-ng/prefix from the
# source distribution of the PyPI package "zlib-ng" (it carries zlib-ng's C
# sources). Prints the prefix. The result is cached across runs. PYTHON names
# the interpreter whose pip downloads it (python3 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_ZLIB_NG=${PY_ZLIB_NG:-1.1.0}
root=$PWD/.build/zlib-ng
prefix=$root/prefix
if [ -f "$prefix/lib/libz.a" ]; then
  echo "$prefix"
  exit 0
fi
rm -rf "$root"
mkdir -p "$root"
"${PYTHON:-python3}" -m pip download -q --no-binary :all: --no-deps -d "$root" "zlib-ng==$PY_ZLIB_NG" >&2
tar -xzf "$root"/zlib_ng-*.tar.gz -C "$root"
src=$(echo "$root"/zlib_ng-*/src/zlib_ng/zlib-ng)
cmake -S "$src" -B "$root/build" -DZLIB_COMPAT=ON -DBUILD_SHARED_LIBS=OFF \
  -DZLIB_ENABLE_TESTS=OFF -DZLIBNG_ENABLE_TESTS=OFF -DWITH_GTEST=OFF \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
  -DCMAKE_INSTALL_PREFIX="$prefix" >&2
cmake --build "$root/build" -j "$(nproc)" >&2
cmake --install "$root/build" >&2
echo "$prefix"
