"""The soci CLI as a new user meets it: options where they type them, config mistakes caught,
errors that say what to do, read-only commands that leave no trace, short digests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from images import files_layer, write_image
from registryd import Registry, push_layout


def soci(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soci.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as r:
        yield r


@pytest.fixture(scope="module")
def image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("img")
    write_image(layout, "v1", [files_layer({"etc/hello": b"hello\n" * 1000})])
    push_layout(layout, registry.host, "usab:v1", tag="v1")
    return f"{registry.host}/usab:v1"


def test_global_options_after_the_subcommand(image: str, tmp_path: Path) -> None:
    """`soci create --plain-http --root R REF` works as `soci --plain-http --root R create REF`,
    and so do nested commands (`soci index list --root R`)."""
    root = tmp_path / "root"
    proc = soci("create", "--plain-http", image, "--root", str(root), "--min-layer-size", "0")
    assert proc.returncode == 0, proc.stderr
    listed = soci("index", "list", "-q", "--root", str(root))
    assert listed.returncode == 0, listed.stderr
    before = soci("--root", str(root), "index", "list", "-q")
    assert listed.stdout == before.stdout and len(listed.stdout.split()) == 1
    # --config after the subcommand is read too (a config naming the root).
    config = tmp_path / "config.toml"
    config.write_text(f'root = "{root}"\n')
    via_config = soci("index", "ls", "-q", "--config", str(config))
    assert via_config.stdout == before.stdout, via_config.stderr
    # The group level between the two works as well.
    assert soci("index", "--root", str(root), "ls", "-q").stdout == before.stdout


# A config file as upstream soci-snapshotter documents it: every key must be accepted (and the
# ones we have no use for ignored), so moving from upstream never breaks on its config.
UPSTREAM_CONFIG = """\
http_cache_type = "memory"
filesystem_cache_type = "memory"
resolve_result_entry = 3000
debug = false
disable_verification = false
max_concurrency = 100
mount_timeout_sec = 30
fuse_metrics_emit_wait_duration_sec = 60
metrics_address = ""
metrics_network = "tcp"
no_prometheus = false
debug_address = ""
metadata_store = "db"
metadata_db_no_sync = false
metadata_insertion_chunk_size = 2000
skip_check_snapshotter_supported = false
[http]
MaxRetries = 5
MinWaitMsec = 30
MaxWaitMsec = 300000
DialTimeoutMsec = 3000
ResponseHeaderTimeoutMsec = 3000
RequestTimeoutMsec = 30000
[blob]
valid_interval = 60
check_always = false
fetching_timeout_sec = 300
force_single_range_mode = false
max_span_verification_retries = 3
max_retries = 5
min_wait_msec = 30
max_wait_msec = 300000
[directory_cache]
max_lru_cache_entry = 10
max_cache_fds = 10
sync_add = false
direct = true
[fuse]
attr_timeout = 1
entry_timeout = 1
negative_timeout = 1
log_fuse_operations = false
[background_fetch]
disable = false
silence_period_msec = 30000
fetch_period_msec = 500
max_queue_size = 100
drop_policy = "drop"
emit_metric_period_sec = 10
[content_store]
type = "soci"
[kubeconfig_keychain]
enable_keychain = false
[cri_keychain]
enable_keychain = false
image_service_path = "/run/containerd/containerd.sock"
[resolver.host."docker.io".mirrors]
host = "mirror.example"
[snapshotter]
min_layer_size = 0
allow_invalid_mounts_on_restart = false
[pull_modes.soci_v1]
enable = false
[pull_modes.soci_v2]
enable = true
[pull_modes.parallel_pull_unpack]
enable = false
max_concurrent_downloads = -1
discard_unpacked_layers = true
"""

PROGRAMS = {"soci": "soci.cli.main", "soci-store": "soci.store.daemon",
            "soci-snapshotter-grpc": "soci.snapshotter.daemon"}


def run_program(name: str, *args: str) -> subprocess.CompletedProcess:
    code = f"import sys; from {PROGRAMS[name]} import main; sys.argv[0] = {name!r}; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("text", "message"), [
    ("[cahce]\nmemory_mb = 1\n", "unknown section [cahce] (did you mean [cache]?)"),
    ('roots = "/x"\n', "unknown key 'roots' (did you mean 'root'?)"),
    ("[blob]\nmax_retry = 3\n", "unknown key [blob] max_retry (did you mean 'max_retries'?)"),
    ("[pull_modes.parallel_pull_unpak]\nenable = true\n",
     "unknown section [pull_modes.parallel_pull_unpak] "
     "(did you mean [pull_modes.parallel_pull_unpack]?)"),
])
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_unknown_config_names_are_one_line_errors(tmp_path: Path, program: str, text: str,
                                                  message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    root = tmp_path / "root"
    args = {"soci": ["index", "list"], "soci-store": [str(tmp_path / "mnt")],
            "soci-snapshotter-grpc": []}[program]
    proc = run_program(program, "--config", str(config), "--root", str(root), *args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"Error: config file {config}: {message}"]
    assert not root.exists() and not (tmp_path / "mnt").exists()


def test_upstream_config_file_is_accepted(tmp_path: Path) -> None:
    from soci.snapshotter.config import load_snapshotter_config

    config = tmp_path / "config.toml"
    config.write_text(UPSTREAM_CONFIG)
    cfg = load_snapshotter_config(str(config))
    assert cfg.metrics_address == "" and cfg.store.max_retries == 5
    proc = soci("--config", str(config), "--root", str(tmp_path / "root"), "index", "list")
    assert proc.returncode == 0, proc.stderr


def _gzip_tar(path: Path) -> Path:
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path


def test_unwritable_output_names_the_output_not_a_temp_file(tmp_path: Path) -> None:
    layer = _gzip_tar(tmp_path / "layer.tar.gz")
    out = tmp_path / "nonexist" / "dir" / "x"
    proc = soci("ztoc", "build", str(layer), "-o", str(out))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: No such file or directory: {out}"
    assert ".tmp-" not in proc.stderr


def test_config_type_errors_read_as_english(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[blob]\nmax_retries = 'lots'\n")
    proc = run_program("soci-store", "--config", str(config), "--root", str(tmp_path / "r"),
                       str(tmp_path / "mnt"))
    assert proc.returncode == 1
    assert "[blob] max_retries must be an integer" in proc.stderr


def test_tls_against_plain_http_registry_hints_plain_http(image: str, tmp_path: Path) -> None:
    proc = soci("--root", str(tmp_path / "root"), "create", image)
    assert proc.returncode == 1
    assert "TLS error" in proc.stderr and "use --plain-http" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_existing_file_or_directory_as_ref_hints_the_transport(tmp_path: Path) -> None:
    (tmp_path / "image.tar").write_bytes(b"")
    (tmp_path / "layout").mkdir()
    root = str(tmp_path / "root")
    cases = {
        "image.tar": "'image.tar' is a file here: write oci-archive:image.tar for an image "
                     "archive (or docker://image.tar for the registry image "
                     "docker.io/library/image.tar:latest)",
        str(tmp_path / "image.tar"): f"'{tmp_path}/image.tar' is a file here: write "
                                     f"oci-archive:{tmp_path}/image.tar for an image archive",
        "./layout": "'./layout' is a directory here: write oci:./layout for an OCI layout",
    }
    for ref, message in cases.items():
        proc = subprocess.run([sys.executable, "-m", "soci.cli", "--root", root, "create", ref],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"Error: {message}"


def test_read_only_commands_do_not_create_the_store(tmp_path: Path) -> None:
    root = tmp_path / "root"
    digest = "sha256:" + "ab" * 32
    for args, code, out in [
        (("index", "list"), 0, "DIGEST"),
        (("index", "list", "-q", "--ref", "app:v1"), 0, ""),
        (("ztoc", "list", "--json"), 0, "[]"),
        (("ztoc", "ls", "--image-ref", "app:v1", "-q"), 0, ""),
        (("index", "info", digest), 1, ""),
        (("ztoc", "info", digest), 1, ""),
        (("ztoc", "get-file", digest, "etc/hello"), 1, ""),
    ]:
        proc = soci("--root", str(root), *args)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stdout.startswith(out)
        if code:
            assert proc.stderr.strip() == (
                f"Error: {'SOCI index' if args[0] == 'index' else 'zTOC'} {digest} is not in "
                f"{root} (no store there)")
        assert not root.exists(), args


def test_digest_prefixes(tmp_path: Path) -> None:
    """Unique prefixes work wherever an index or zTOC digest is taken; an ambiguous or
    unmatched one is a clear error. 16 layers give 17 digests: two must share a first digit."""
    import json
    from collections import Counter

    layout = tmp_path / "layout"
    write_image(layout, "v1", [files_layer({f"f{i}": b"%d" % i * 5000}) for i in range(16)])
    root = str(tmp_path / "root")
    assert soci("create", "--root", root, "--min-layer-size", "0",
                f"oci:{layout}:v1").returncode == 0
    index = soci("index", "ls", "-q", "--root", root).stdout.split()
    ztocs = soci("ztoc", "ls", "-q", "--root", root).stdout.split()
    assert len(index) == 1 and len(ztocs) == 16
    full = soci("index", "info", index[0], "--root", root)
    assert full.returncode == 0, full.stderr
    digests = index + ztocs

    def unique(d: str) -> str:
        """The shortest prefix of ``d`` no other digest shares."""
        n = 1
        while any(o != d and o[7:7 + n] == d[7:7 + n] for o in digests):
            n += 1
        return d[7:7 + n]

    for prefix in (unique(index[0]), "sha256:" + unique(index[0]), index[0][7:19]):
        got = soci("index", "info", prefix, "--root", root)
        assert got.returncode == 0 and got.stdout == full.stdout, (prefix, got.stderr)
    z = ztocs[5]
    info = soci("ztoc", "info", unique(z), "--root", root)
    assert info.returncode == 0 and json.loads(info.stdout)["num_files"] == 1, info.stderr
    listed = soci("ztoc", "ls", "-q", "--ztoc-digest", z[7:19], "--root", root)
    assert listed.stdout.split() == [z]
    wrong_kind = soci("index", "info", unique(z), "--root", root)
    assert wrong_kind.stderr.strip() == f"Error: {z} is a zTOC: use soci ztoc info"

    shared = next(c for c, n in Counter(d[7] for d in digests).items() if n > 1)
    for args in (("index", "info", shared), ("ztoc", "info", shared)):
        amb = soci(*args, "--root", root)
        assert amb.returncode == 1
        assert amb.stderr.startswith(f"Error: {shared} is ambiguous: ")
        assert amb.stderr.rstrip().endswith("give more digits")
    missing = next(p for p in (f"{i:x}" * 8 for i in range(16))
                   if not any(d[7:].startswith(p) for d in digests))
    nomatch = soci("index", "info", missing, "--root", root)
    assert nomatch.stderr.strip() == (
        f"Error: no SOCI index digest starts with {missing} in {root}")
    assert "invalid digest" in soci("index", "info", "junk", "--root", root).stderr
