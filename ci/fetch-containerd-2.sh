#!/usr/bin/env bash
# Unpack Debian sid's containerd 2.x package into DEST (default .build/containerd-2) without
# installing it: a private APT_CONFIG names a sid source and private list/cache directories, so
# the system's apt sources and state stay untouched. Usage: ci/fetch-containerd-2.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.build/containerd-2}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/soci-apt-sid.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/sources.list.d" "$WORK/preferences.d" "$WORK/lists/partial" \
  "$WORK/cache/archives/partial" "$WORK/deb"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
  >"$WORK/sources.list"
cat >"$WORK/apt.conf" <<CONF
Dir::Etc::SourceList "$WORK/sources.list";
Dir::Etc::SourceParts "$WORK/sources.list.d";
Dir::Etc::Preferences "$WORK/preferences";
Dir::Etc::PreferencesParts "$WORK/preferences.d";
Dir::State::Lists "$WORK/lists";
Dir::Cache "$WORK/cache";
Acquire::Check-Valid-Until "false";
Acquire::Languages "none";
APT::Sandbox::User "root";
CONF
export APT_CONFIG="$WORK/apt.conf"
echo "ci/fetch-containerd-2.sh: downloading containerd from Debian sid"
apt-get update -qq
(cd "$WORK/deb" && apt-get download -qq containerd)
deb=$(echo "$WORK"/deb/containerd_*.deb)
rm -rf "$DEST.partial"
mkdir -p "$DEST.partial"
dpkg -x "$deb" "$DEST.partial"
for tool in containerd containerd-shim-runc-v2 ctr; do
  [ -x "$DEST.partial/usr/bin/$tool" ] || { echo "ci/fetch-containerd-2.sh: $tool missing in $deb" >&2; exit 1; }
done
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "ci/fetch-containerd-2.sh: $("$DEST/usr/bin/containerd" --version) in $DEST"
