#!/usr/bin/env bash
# Install everything soci needs on a fresh Debian 12 machine (as root), then the
# package itself into ./.venv. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config zlib1g-dev cmake   # the Cython core: zlib, or zlib-ng built here
  libzstd-dev                              # the Cython core: libzstd (linked statically)
  fuse3 libfuse3-dev                       # the layer filesystem (FUSE)
  flatbuffers-compiler                     # flatc: tests re-read zTOCs independently
  pigz libarchive-tools tar gzip zstd      # other tar and gzip writers the tests use
  busybox-static                           # a shell and tools inside test images
  podman skopeo buildah docker-registry runc fuse-overlayfs   # images, registry, podman
  containerd                               # containerd 1.6 and ctr (tests start their own)
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "ci/setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Tests start private containerd daemons; the package's system-wide service must not run.
  if [[ " ${missing[*]} " == *" containerd "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now containerd.service >/dev/null 2>&1 || true
  fi
fi

# containerd 2.x (what current Kubernetes nodes run) from Debian sid, unpacked, NOT installed:
# only its containerd, containerd-shim-runc-v2 and ctr binaries are used, from
# .build/containerd-2/usr/bin (tests/containerdenv.py). A private APT_CONFIG keeps the sid
# source away from the system's apt.
if [ ! -x .build/containerd-2/usr/bin/containerd ]; then
  bash ci/fetch-containerd-2.sh .build/containerd-2
fi

# podman 5 (Debian trixie) in a root cached outside the clone, for the podman 5 end-to-end
# tests (tests/podmanenv.py chroots into it). Built once (a few minutes), then reused; fails
# clearly when it cannot be built (no network and no cache): those tests need it.
bash ci/podman5-root.sh || { echo "ci/setup.sh: retrying the podman 5 root once" >&2; sleep 10; bash ci/podman5-root.sh; }

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The fast path: link the native core against zlib-ng (SOCI_ZLIB=system opts out).
if [ "${SOCI_ZLIB:-zlib-ng}" = "zlib-ng" ]; then
  SOCI_ZLIB_PREFIX=$(bash ci/build-zlib-ng.sh)
  export SOCI_ZLIB_PREFIX
fi
.venv/bin/python -m pip install -q -e ".[test,dev]"
echo "ci/setup.sh: ready ($(.venv/bin/soci --version))"
