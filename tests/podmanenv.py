"""An isolated podman for tests: private storage, configuration and state under one directory.

:class:`Podman` writes its own ``storage.conf`` (overlay driver, optionally an Additional
Layer Store), ``containers.conf`` (runc, cgroupfs, file events, no network, the rlimits this
host allows), ``registries.conf`` (the given hosts insecure, no search registries) and a
``policy.json`` accepting anything, and points only the podman processes it starts at them
through environment variables: ``/etc`` and the caller's environment are left alone.

With ``chroot=ROOT`` the same configuration drives podman 5 from a Debian trixie root made by
``ci/podman5-root.sh`` (see :class:`Chroot`): podman runs chrooted into ROOT inside a private
mount namespace, so nothing it mounts is seen on the host, and everything vanishes with the
namespace even when a test dies. Paths it is given (its directories, an Additional Layer Store)
must then lie inside ROOT; :func:`chroot_scratch` makes a directory there.

Every subprocess has a timeout. :meth:`Podman.close` removes containers and images, unmounts
whatever is still mounted under its directories (as read from ``/proc/mounts``) and deletes
them.

Two things make ``podman run`` hang for 20 s after the container exits on these machines,
both because conmon's exit command (``podman container cleanup``) fails:

* a runroot longer than 50 characters (podman's CLI refuses such a ``--runroot``): the
  runroot then lives in a short directory under ``/tmp`` instead of under ``workdir``;
* ``--log-level=debug``, which makes podman pass ``--syslog`` to the exit command, which
  fails without ``/dev/log``. Use ``log_level="debug"`` on ``pull`` freely, on ``run`` only
  when the 20 s do not matter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

PODMAN = "podman"
#: Seconds any one podman command may take (pulls of test images are small).
DEFAULT_TIMEOUT = 120.0
_CLEANUP_TIMEOUT = 60.0
_MAX_RUNROOT = 50
_ULIMITS = ["nofile=20000:20000", "nproc=32768:32768"]
#: Where ci/podman5-root.sh caches the Debian trixie root with podman 5 (outside the clone).
PODMAN5_ROOT = Path(os.environ.get("SOCI_PODMAN5_ROOT", "/var/cache/soci-ci/podman5-trixie"))
_PODMAN5_MARKER = ".soci-podman5-recipe"
#: The PATH podman and its helpers (conmon, runc, netavark) are found on inside the root.
_CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def podman_available() -> str | None:
    """Why podman cannot run containers here, or ``None`` when it (probably) can."""
    if os.geteuid() != 0:
        return "podman tests need root (rootful podman with the overlay driver)"
    for tool, package in (
        (PODMAN, "podman"), ("runc", "runc"), ("conmon", "conmon"),
    ):
        if shutil.which(tool) is None and not Path(f"/usr/libexec/podman/{tool}").exists():
            return f"{tool} not found (Debian package {package})"
    try:
        proc = subprocess.run(
            [PODMAN, "--version"], capture_output=True, timeout=30, check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"podman --version failed: {e}"
    if proc.returncode != 0:
        return f"podman --version failed: {proc.stderr.decode(errors='replace')[-500:]}"
    if not Path("/proc/filesystems").read_text().count("overlay"):
        return "the kernel has no overlay filesystem"
    return None


def _toml_str(value: str | os.PathLike[str]) -> str:
    """A TOML basic string (json.dumps escapes compatibly for the strings we write)."""
    return json.dumps(str(value))


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


def _unescape_mount_path(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(*roots: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below any of ``roots``, deepest (and latest) first."""
    prefixes = [os.path.realpath(r) for r in roots]
    found: list[str] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 2:
                continue
            point = _unescape_mount_path(fields[1])
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    # Later mounts may stack on earlier ones: unmount in reverse order.
    return list(reversed(found))


def unmount_all_under(*roots: str | os.PathLike[str]) -> list[str]:
    """Unmount everything below ``roots`` (bounded passes, lazy as a last resort).

    Returns what was still mounted after trying (empty on success)."""
    for attempt in range(5):
        points = mounts_under(*roots)
        if not points:
            return []
        for point in points:
            flags = ["-l"] if attempt >= 3 else []
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    ["umount", *flags, point], capture_output=True, timeout=30, check=False,
                )
    return mounts_under(*roots)


def run_bounded(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
    timeout: float,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` in its own process group, capturing its output.

    On timeout the whole group (podman and the helpers that did not start their own
    session) is killed and :class:`subprocess.TimeoutExpired` raised."""
    with subprocess.Popen(
        argv, env=env, cwd=cwd, start_new_session=True,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
            raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def podman5_available(root: Path = PODMAN5_ROOT) -> str | None:
    """Why podman 5 from ``root`` cannot run here, or ``None`` when it (probably) can."""
    if os.geteuid() != 0:
        return "podman 5 tests need root (chroot, mount namespaces)"
    if not (root / _PODMAN5_MARKER).is_file():
        return f"no podman 5 root at {root}: run ci/podman5-root.sh (ci/setup.sh does)"
    for tool in ("unshare", "nsenter", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package util-linux / coreutils)"
    return None


def chroot_scratch(root: Path = PODMAN5_ROOT, prefix: str = "soci-test-") -> Path:
    """A fresh directory inside ``root`` (under its ``/tmp``), for a podman's directories and
    an Additional Layer Store's mountpoint: what podman in the chroot must see. Delete it
    with :func:`shutil.rmtree` once nothing is mounted below it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root / "tmp"))


class Chroot:
    """A private mount namespace holding ``root`` ready to chroot into; commands enter it.

    A holder process (``unshare -m`` running ``sleep``) owns the namespace; in it ``root`` is
    bound recursively onto itself (podman remounts ``/``: without a mount point there every
    layer fails with "remount /, flags: 0x44000: invalid argument"), with ``/proc``, ``/sys``
    and ``/dev`` (rslave) and a tmpfs ``/run``. Mounts made inside (podman's overlays) never
    reach the host, and all go when the namespace does: :meth:`close` kills the holder, and
    the kernel kills it too when the test process dies (``PR_SET_PDEATHSIG``).

    The namespace is a copy of the host's mounts when it starts, and the host's ``/`` is
    private here: a FUSE store mounted inside ``root`` on the host is seen only if mounted
    BEFORE the namespace starts. The namespace therefore starts lazily, at the first
    :meth:`argv` call (the first podman command). FUSE mounts other than those at or below
    ``keep`` are dropped from the copy, so this namespace never keeps another test's FUSE
    connection alive.
    """

    def __init__(self, root: Path, *, keep: list[str] | tuple[str, ...] = ()) -> None:
        self.root = Path(os.path.realpath(root))
        #: Host paths whose FUSE mounts the namespace keeps (an Additional Layer Store's).
        self.keep = [os.path.realpath(k) for k in keep]
        self.holder: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def inner(self, path: str | os.PathLike[str]) -> str:
        """The path, as seen inside the chroot, of host path ``path`` (which must be in root)."""
        real = os.path.realpath(path)
        if not (real == str(self.root) or real.startswith(str(self.root) + "/")):
            raise ValueError(f"{path} is not inside the chroot {self.root}")
        return "/" + os.path.relpath(real, self.root).removeprefix(".")

    def _start(self) -> None:
        script = r"""
set -e
r=$1; shift
# Drop FUSE mounts this namespace does not need (before they are copied below), so it never
# keeps another test's FUSE connection alive; keep the ones at or below the paths given.
awk '$3 ~ /^fuse/ {print $2}' /proc/self/mounts | while read -r m; do
  keep=no
  for k in "$@"; do case "$m/" in "$k"/*) keep=yes ;; esac; done
  [ "$keep" = yes ] || umount -l "$m" 2>/dev/null || true
done
mount --rbind "$r" "$r"
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"; mount --make-rslave "$r/sys"
mount --rbind /dev "$r/dev"; mount --make-rslave "$r/dev"
mount -t tmpfs -o mode=755 tmpfs "$r/run"
echo ready
exec sleep infinity
"""

        def die_with_parent() -> None:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
             str(self.root), *self.keep],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()  # "ready", or EOF when the script failed
        if line.strip() != b"ready":
            self.holder.kill()
            _, err = self.holder.communicate(timeout=30)
            self.holder = None
            raise RuntimeError(f"cannot set up the chroot {self.root}: {err.decode()[-2000:]}")

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run chrooted in the namespace (started now if needed)."""
        with self._lock:
            if self.holder is None:
                self._start()
            assert self.holder is not None
            pid = self.holder.pid
        return ["nsenter", "-t", str(pid), "-m", "--", "chroot", str(self.root),
                "/usr/bin/env", f"PATH={_CHROOT_PATH}", *argv]

    def close(self) -> None:
        """Kill the holder: the namespace and every mount in it go once its processes have."""
        with self._lock:
            holder, self.holder = self.holder, None
        if holder is not None:
            holder.kill()
            holder.communicate(timeout=30)


class PodmanError(RuntimeError):
    def __init__(self, args: list[str], proc: subprocess.CompletedProcess[bytes]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        tail = proc.stderr.decode(errors="replace")[-3000:]
        super().__init__(f"podman {' '.join(args)} exited with {proc.returncode}: {tail}")


class Podman:
    """A private podman configuration under ``workdir`` (created if needed).

    ``additional_layer_store``: an absolute directory used as a containers/storage
    Additional Layer Store with the ``:ref`` option (layers are looked up at
    ``<store>/<base64(image reference)>/<compressed digest>/``).
    ``insecure_registries``: ``host:port`` entries podman may talk plain HTTP to.
    ``chroot``: run the podman of this root (``ci/podman5-root.sh``, podman 5) instead of the
    host's; ``workdir`` and ``additional_layer_store`` must then lie inside it (the attributes
    below stay host paths; :meth:`inner` maps one to what podman sees).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        additional_layer_store: str | os.PathLike[str] | None = None,
        insecure_registries: list[str] | tuple[str, ...] = (),
        timeout: float = DEFAULT_TIMEOUT,
        chroot: str | os.PathLike[str] | None = None,
    ) -> None:
        self.chroot = None if chroot is None else Chroot(
            Path(chroot), keep=[] if additional_layer_store is None else [additional_layer_store])
        Path(workdir).mkdir(parents=True, exist_ok=True)
        if self.chroot is not None:
            self.chroot.inner(workdir)  # raises unless podman in the chroot can see it
        # A fresh subdirectory: close() deletes it wholesale, never the caller's workdir.
        self.dir = Path(tempfile.mkdtemp(prefix="podman-", dir=os.path.abspath(workdir)))
        self.graphroot = self.dir / "root"
        self.runroot = self.dir / "run"
        if len(self._p(self.runroot)) > _MAX_RUNROOT:
            # podman's CLI (which conmon's exit command, `podman container cleanup`, uses)
            # refuses a --runroot longer than 50 characters: the cleanup then fails and
            # every `podman run` waits 20 s for it. Use a short private directory instead.
            tmp = "/tmp" if self.chroot is None else str(self.chroot.root / "tmp")
            self.runroot = Path(tempfile.mkdtemp(prefix="soci-podman-run-", dir=tmp))
        self.tmpdir = self.dir / "tmp"
        self.confdir = self.dir / "conf"
        self.home = self.dir / "home"
        self.events_log = self.dir / "events.log"
        self.timeout = timeout
        self.additional_layer_store = (
            None if additional_layer_store is None
            else self._p(os.path.abspath(additional_layer_store))
        )
        self.insecure_registries = list(insecure_registries)
        self._closed = False
        try:
            self._write_config()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self.runroot, ignore_errors=True)
            raise
        self.env = self._environment()

    # -- configuration -------------------------------------------------------------------

    def _p(self, path: str | os.PathLike[str]) -> str:
        """``path`` as podman sees it (inside the chroot, if any)."""
        return str(path) if self.chroot is None else self.chroot.inner(path)

    def inner(self, path: str | os.PathLike[str]) -> str:
        """Host path ``path`` as this podman sees it (the same path without a chroot)."""
        return self._p(path)

    def _write_config(self) -> None:
        for d in (self.graphroot, self.runroot, self.tmpdir, self.confdir,
                  self.home / ".config" / "containers", self.dir / "networks",
                  self.dir / "image-copy-tmp"):
            d.mkdir(parents=True, exist_ok=True)
        storage = [
            "[storage]",
            'driver = "overlay"',
            f"graphroot = {_toml_str(self._p(self.graphroot))}",
            f"runroot = {_toml_str(self._p(self.runroot))}",
            "",
            "[storage.options]",
        ]
        if self.additional_layer_store is not None:
            storage.append(
                f"additionallayerstores = {_toml_list([self.additional_layer_store + ':ref'])}"
            )
        storage += ["", "[storage.options.overlay]", 'mountopt = "nodev"', ""]
        (self.confdir / "storage.conf").write_text("\n".join(storage))

        containers = [
            "[containers]",
            f"default_ulimits = {_toml_list(_ULIMITS)}",
            'log_driver = "k8s-file"',
            'netns = "none"',
            "",
            "[engine]",
            'runtime = "runc"',
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f"events_logfile_path = {_toml_str(self._p(self.events_log))}",
            f"tmp_dir = {_toml_str(self._p(self.tmpdir))}",
            f"image_copy_tmp_dir = {_toml_str(self._p(self.dir / 'image-copy-tmp'))}",
            "",
            "[network]",
            f"network_config_dir = {_toml_str(self._p(self.dir / 'networks'))}",
            "",
        ]
        (self.confdir / "containers.conf").write_text("\n".join(containers))

        registries = ["unqualified-search-registries = []", 'short-name-mode = "disabled"', ""]
        for host in self.insecure_registries:
            registries += [
                "[[registry]]",
                f"location = {_toml_str(host)}",
                "insecure = true",
                "",
            ]
        (self.confdir / "registries.conf").write_text("\n".join(registries))

        policy = json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        (self.confdir / "policy.json").write_text(policy)
        # containers/image reads $HOME/.config/containers/policy.json before /etc's.
        (self.home / ".config" / "containers" / "policy.json").write_text(policy)
        (self.confdir / "auth.json").write_text('{"auths": {}}')

    def _environment(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("CONTAINERS_", "REGISTRY_AUTH", "XDG_", "DOCKER_", "BUILDAH_"))
        }
        env.update(
            CONTAINERS_STORAGE_CONF=self._p(self.confdir / "storage.conf"),
            CONTAINERS_CONF=self._p(self.confdir / "containers.conf"),
            CONTAINERS_REGISTRIES_CONF=self._p(self.confdir / "registries.conf"),
            REGISTRY_AUTH_FILE=self._p(self.confdir / "auth.json"),
            HOME=self._p(self.home),
            XDG_CONFIG_HOME=self._p(self.home / ".config"),
            XDG_DATA_HOME=self._p(self.home / ".local" / "share"),
            TMPDIR=self._p(self.dir / "image-copy-tmp"),
        )
        return env

    # -- running podman ------------------------------------------------------------------

    def command(
        self,
        *args: str,
        check: bool = True,
        timeout: float | None = None,
        input: bytes | None = None,
        log_level: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman ARGS`` with this configuration; raise :class:`PodmanError` on failure
        when ``check``. ``log_level`` (e.g. ``"debug"``) goes before the subcommand."""
        if self._closed:
            raise RuntimeError("this Podman has been closed")
        argv = list(args)
        if log_level is not None:
            argv = [f"--log-level={log_level}", *argv]
        full = [PODMAN, *argv] if self.chroot is None else self.chroot.argv(["podman", *argv])
        proc = run_bounded(
            full,
            env=self.env,
            cwd=self.dir,
            input=input,
            timeout=self.timeout if timeout is None else timeout,
        )
        if check and proc.returncode != 0:
            raise PodmanError(argv, proc)
        return proc

    def pull(self, ref: str, *, log_level: str | None = None) -> str:
        """``podman pull --tls-verify=false REF``; the pulled image's full ID."""
        proc = self.command("pull", "--quiet", "--tls-verify=false", ref, log_level=log_level)
        lines = proc.stdout.decode().split()
        if not lines:
            raise RuntimeError(f"podman pull {ref} printed no image ID")
        return lines[-1]

    def run(self, ref: str, *cmd: str, log_level: str | None = None) -> bytes:
        """``podman run --rm --network=none REF CMD...``; the container's stdout."""
        proc = self.command(
            "run", "--rm", "--network=none", "--tls-verify=false", ref, *cmd,
            log_level=log_level,
        )
        return proc.stdout

    def images(self) -> list[dict[str, Any]]:
        """``podman images --format json`` parsed."""
        out = self.command("images", "--format", "json").stdout
        return list(json.loads(out or b"[]"))

    def rmi(self, ref: str, *, force: bool = False) -> None:
        self.command("rmi", *(["--force"] if force else []), ref)

    # -- cleanup -------------------------------------------------------------------------

    def close(self) -> None:
        """Remove containers and images, unmount everything below our dirs, delete them.

        Raises only when something stays mounted (the directories are then kept); a failed
        ``podman rm``/``rmi`` is harmless once the directories holding their state are gone.
        """
        if self._closed:
            return
        problems: list[str] = []
        for args in (("rm", "--all", "--force", "--time", "0"), ("rmi", "--all", "--force")):
            try:
                proc = self.command(*args, check=False, timeout=_CLEANUP_TIMEOUT)
                if proc.returncode != 0:
                    problems.append(f"podman {' '.join(args)}: {proc.stderr[-500:]!r}")
            except (OSError, subprocess.TimeoutExpired) as e:
                problems.append(f"podman {' '.join(args)}: {e}")
        self._closed = True
        if self.chroot is not None:
            self.chroot.close()
        left = unmount_all_under(self.dir, self.runroot)
        if left:
            raise RuntimeError("; ".join([*problems, f"still mounted: {left}"]))
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
