"""A daemon's FUSE mount point at start: free, a stale mount left by a crash (detached), or
someone's live or hung mount (refused, never touched)."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import threading

from soci.errors import SociError

log = logging.getLogger("soci.serve")


#: Seconds a mounted filesystem gets to answer statfs before we call it hung.
PROBE_TIMEOUT = 5.0


def _unescape(field: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_at(path: str) -> str | None:
    """The filesystem type mounted exactly at ``path`` (the latest mount), or ``None``."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5 or " - " not in line:
                continue
            if _unescape(fields[4]) == path:
                found = line.split(" - ", 1)[1].split()[0]
    return found


def _target(mountpoint: str) -> str:
    """The absolute path the kernel mounts ``mountpoint`` on, found without looking at a
    mount there: stat'ing a dead FUSE mount fails (ENOTCONN) and a hung one blocks, so only
    parents are resolved, and a symlink (never a mount point) is followed by hand."""
    path = os.path.abspath(mountpoint)
    for _ in range(40):  # the kernel's own limit on nested links
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if mount_at(path) is not None:
            return path
        try:
            link = os.readlink(path)
        except OSError:
            return path  # not a symlink, or missing (made next)
        path = os.path.join(os.path.dirname(path), link)
    return path


def probe_mount(path: str, timeout: float = PROBE_TIMEOUT) -> str:
    """``"stale"`` (a FUSE mount whose daemon is gone), ``"live"`` (it answers) or ``"hung"``.

    statfs always goes to the filesystem (stat may be answered from the kernel's attribute
    cache even on a dead FUSE mount); it runs on a thread so a hung daemon cannot hang us.
    """
    result: list[BaseException | None] = []

    def statfs() -> None:
        try:
            os.statvfs(path)
            result.append(None)
        except OSError as e:
            result.append(e)

    thread = threading.Thread(target=statfs, name="soci-mount-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return "hung"
    error = result[0]
    if isinstance(error, OSError) and error.errno in (errno.ENOTCONN, errno.ECONNABORTED):
        return "stale"
    return "live"


def cleanup_stale_mount(mountpoint: str) -> None:
    """Detach a dead mount at ``mountpoint`` (a crashed daemon leaves one: ENOTCONN).

    A mount that answers is someone's live filesystem (another soci-store, most likely):
    it is refused, never unmounted. So is one that does not answer in time: it may be a
    stopped daemon that would come back.
    """
    target = _target(mountpoint)
    fstype = mount_at(target)
    if fstype is None:
        try:
            os.stat(target)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                return  # missing (created next) or not ours to judge: mounting will tell
        state = "stale"  # a dead FUSE mount not listed under this path
    else:
        state = probe_mount(target)
    if state == "live":
        raise SociError(f"{target} is already mounted ({fstype}) and answering: another "
                        "soci daemon serving it? stop that one first")
    if state == "hung":
        raise SociError(f"{target} is mounted ({fstype}) but does not answer within "
                        f"{PROBE_TIMEOUT:g} s (a stopped or hung soci daemon?); stop its "
                        f"daemon or unmount it with 'fusermount3 -u -z {target}'")
    log.warning("cleaning up a stale mount at %s", target)
    for command in (["fusermount3", "-u", "-z", target], ["umount", "-l", target]):
        try:
            if subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise SociError(f"cannot clean up the stale mount at {target}")
