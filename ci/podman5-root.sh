#!/usr/bin/env bash
# Build (once) a Debian trixie root with podman 5 in it, for the podman 5 end-to-end tests
# (tests/podmanenv.py runs podman 5 chrooted into it). Usage: ci/podman5-root.sh [ROOT]
#
# The root lives OUTSIDE the clone (default /var/cache/soci-ci/podman5-trixie, or
# $SOCI_PODMAN5_ROOT): CI reruns on the same machine from a fresh clone and reuses it. The
# build is atomic: debootstrap and apt run in a temporary sibling directory which is renamed
# into place only once complete, with a marker naming the recipe version, so an interrupted
# build never leaves a half root that looks done. A lock keeps concurrent runs from building
# twice. The host's apt state is untouched (everything is installed inside the root).
set -euo pipefail

# The Debian suite: trixie (podman 5.4) is what the tests use; SOCI_PODMAN5_SUITE=sid (podman
# 5.8 at the time of writing) builds a root to check newer podman by hand.
SUITE=${SOCI_PODMAN5_SUITE:-trixie}
# Bump when the recipe below changes: a root with another marker is rebuilt.
RECIPE="podman5-$SUITE v1"
ROOT=${1:-${SOCI_PODMAN5_ROOT:-/var/cache/soci-ci/podman5-$SUITE}}
MIRROR=${SOCI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=(podman runc conmon fuse-overlayfs skopeo buildah busybox-static catatonit netavark
  aardvark-dns passt containers-storage)
MARKER=.soci-podman5-recipe

say() { echo "ci/podman5-root.sh: $*" >&2; }
done_already() { [ "$(cat "$ROOT/$MARKER" 2>/dev/null || true)" = "$RECIPE" ]; }

if done_already; then
  say "cached: $(cat "$ROOT/.soci-podman5-version" 2>/dev/null) in $ROOT"
  exit 0
fi

parent=$(dirname "$ROOT")
mkdir -p "$parent"
exec 9>"$parent/.$(basename "$ROOT").lock"
flock 9
if done_already; then  # built by a concurrent run while we waited for the lock
  say "cached (built concurrently) in $ROOT"
  exit 0
fi

# Leftovers of builds that were killed (a trap cannot run on SIGKILL): never used, as they
# have no marker; only the lock holder builds, so none of them is in progress.
for stale in "$parent/.$(basename "$ROOT").build."* "$parent/.$(basename "$ROOT").old."*; do
  [ -e "$stale" ] || continue
  say "removing the leftover $stale"
  rm -rf --one-file-system "$stale"
done

started=$(date +%s)
if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap on the host"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap \
    >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  } || { say "ERROR: cannot install debootstrap (network down?) and no cached root at $ROOT"; exit 1; }
fi

# Same filesystem as ROOT, so the final rename is atomic.
WORK=$(mktemp -d "$parent/.$(basename "$ROOT").build.XXXXXX")
cleanup() {
  # The chroot steps run in their own mount namespace (unshare -m), so nothing is mounted
  # under WORK on the host; unmount defensively anyway before deleting.
  for m in $(awk -v p="$WORK" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

say "building a Debian $SUITE root with podman 5 in $ROOT (debootstrap, a few minutes)"
if ! debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$WORK" "$MIRROR" \
    >"$WORK.log" 2>&1; then
  tail -n 30 "$WORK.log" >&2
  rm -f "$WORK.log"
  say "ERROR: debootstrap failed (network down? mirror $MIRROR unreachable?) and no cached root at $ROOT"
  exit 1
fi
rm -f "$WORK.log"

# No daemons may start inside the root while packages install.
printf '#!/bin/sh\nexit 101\n' >"$WORK/usr/sbin/policy-rc.d"
chmod 755 "$WORK/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$WORK/etc/resolv.conf" 2>/dev/null || true
# sid's Release files may be past their Valid-Until on a mirror snapshot.
[ "$SUITE" = trixie ] || echo 'Acquire::Check-Valid-Until "false";' >"$WORK/etc/apt/apt.conf.d/99soci"

# apt inside the root, with /proc and /dev mounted in a private mount namespace: they vanish
# with it, whatever happens.
if ! unshare -m --propagation private sh -c '
    set -e
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    mount -t tmpfs tmpfs "$1/run"
    shift
    root=$1; shift
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Acquire::Retries=3 \
      --no-install-recommends "$@"
    chroot "$root" apt-get clean
  ' sh "$WORK" "$WORK" "${PACKAGES[@]}" >"$WORK.log" 2>&1; then
  tail -n 30 "$WORK.log" >&2
  rm -f "$WORK.log"
  say "ERROR: installing podman 5 inside the root failed (see above)"
  exit 1
fi
rm -f "$WORK.log"
rm -f "$WORK/usr/sbin/policy-rc.d"

version=$(unshare -m --propagation private sh -c '
    mount -t proc proc "$1/proc" && chroot "$1" /usr/bin/podman --version' sh "$WORK" 2>&1 || true)
case "$version" in
  "podman version 5."*) ;;
  *) say "ERROR: the root's podman is not podman 5: '$version'"; exit 1 ;;
esac
echo "$version" >"$WORK/.soci-podman5-version"
echo "$RECIPE" >"$WORK/$MARKER"
chmod 755 "$WORK"  # mktemp made it 0700

# Replace an older root (another recipe) only now that the new one is complete.
if [ -e "$ROOT" ]; then
  old="$parent/.$(basename "$ROOT").old.$$"
  mv "$ROOT" "$old"
  rm -rf --one-file-system "$old"
fi
mv "$WORK" "$ROOT"
trap - EXIT
say "built $version in $ROOT in $(( $(date +%s) - started )) s"
