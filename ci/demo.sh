#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, make a sample layer from
# this machine's /usr/lib, build its zTOC, show its summary and read a file
# back through the checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python bench/make_layer.py "$work/sample.tar.gz" --tar-bytes $((64 << 20))
.venv/bin/soci ztoc build "$work/sample.tar.gz" -o "$work/sample.ztoc"
.venv/bin/soci ztoc info "$work/sample.ztoc" | head -n 9
path=$(tar -tzf "$work/sample.tar.gz" | grep -v '/$' | sed -n '200p')
echo "reading $path through the zTOC:"
.venv/bin/soci ztoc get-file "$work/sample.ztoc" "$path" --layer "$work/sample.tar.gz" | sha256sum
echo "reading it with tar:"
tar -xOzf "$work/sample.tar.gz" "$path" | sha256sum
