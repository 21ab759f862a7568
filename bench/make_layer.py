"""Create the benchmark layer: a reproducible tar of this machine's /usr/lib, gzip -6.

Files are taken in sorted order until the tar reaches --tar-bytes, so the
layer is real-world content (binaries, libraries, Python sources) of a
predictable size. The result is cached: it is rebuilt only if missing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def pick_files(root: str, limit: int) -> list[str]:
    chosen, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            chosen.append(os.path.relpath(path, "/"))
            total += st.st_size + 512
            if total >= limit:
                return chosen
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", help="path of the .tar.gz to create")
    parser.add_argument("--root", default="/usr/lib")
    parser.add_argument("--tar-bytes", type=int, default=1200 << 20)
    parser.add_argument("--level", default="6")
    args = parser.parse_args()
    if os.path.exists(args.output):
        print(f"{args.output} exists", file=sys.stderr)
        return
    files = pick_files(args.root, args.tar_bytes)
    tmp = args.output + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(tmp, "wb") as out:
        tar = subprocess.Popen(
            ["tar", "-C", "/", "--no-recursion", "--owner=0", "--group=0", "-cf", "-", "-T", "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        gz = subprocess.Popen(["gzip", "-n", f"-{args.level}"], stdin=tar.stdout, stdout=out)
        assert tar.stdin is not None and tar.stdout is not None
        tar.stdout.close()
        tar.stdin.write("\n".join(files).encode() + b"\n")
        tar.stdin.close()
        if tar.wait() not in (0, 1) or gz.wait() != 0:
            raise SystemExit("creating the benchmark layer failed")
    os.replace(tmp, args.output)
    size = os.path.getsize(args.output)
    print(f"{args.output}: {size} bytes, {len(files)} files", file=sys.stderr)


if __name__ == "__main__":
    main()
