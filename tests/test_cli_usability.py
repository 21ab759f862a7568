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


def _bad_layer_images(registry: Registry, tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Images with a corrupt gzip layer, a truncated one and a zstd one, pushed to the
    registry: name -> (reference, layer digest). The digests match the broken bytes, so only
    reading the layer finds what is wrong."""
    import gzip
    import hashlib

    from images import GzipLayerFile

    tar = files_layer({"a": hashlib.shake_256(b"a").digest(300_000), "b": b"b" * 300_000})
    blob = gzip.compress(tar, mtime=0)
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    images = {}
    for name, data in (("corrupt", bytes(corrupt)), ("truncated", blob[:-5000])):
        (tmp_path / f"{name}.gz").write_bytes(data)
        written = write_image(tmp_path / name, "v1",
                              [GzipLayerFile(tmp_path / f"{name}.gz", diff_id)])
        images[name] = written.layers[0].digest
    images["zstd"] = write_image(tmp_path / "zstd", "v1", [tar], compress="zstd").layers[0].digest
    refs = {}
    for name, digest in images.items():
        push_layout(tmp_path / name, registry.host, f"bad-{name}:v1", tag="v1")
        refs[name] = (f"{registry.host}/bad-{name}:v1", digest)
    return refs


def test_bad_layer_errors_name_the_layer_and_the_image(registry: Registry,
                                                      tmp_path: Path) -> None:
    """create and convert stop on a corrupt or truncated gzip layer with one line naming the
    layer digest, the image and what is wrong; an image with every layer skipped names the
    image too."""
    images = _bad_layer_images(registry, tmp_path)
    root = str(tmp_path / "root")
    for name, what in (("corrupt", "corrupt gzip data near compressed offset"),
                       ("truncated", "gzip stream is truncated")):
        ref, layer = images[name]
        for args in (("create", ref), ("convert", ref, f"{registry.host}/bad-{name}:soci")):
            proc = soci("--plain-http", "--root", root, *args, "--min-layer-size", "0", "-q")
            assert proc.returncode == 1, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1, proc.stderr
            assert lines[0].startswith(f"Error: layer {layer} of {ref} (linux/amd64): {what}")
    # Every layer skipped (here: smaller than --min-layer-size) names the image as well.
    ref, layer = images["zstd"]
    proc = soci("--plain-http", "--root", root, "create", ref, "--min-layer-size", "10000000")
    assert proc.returncode == 1
    assert f"layer {layer} (application/vnd.oci.image.layer.v1.tar+zstd)" in proc.stdout
    assert proc.stderr.startswith(f"Error: no zTOCs created for {ref} (linux/amd64): ")


def test_a_corrupted_download_names_the_layer_and_the_image(image: str, registry: Registry,
                                                           tmp_path: Path) -> None:
    """A layer whose bytes change on the way (a proxy flips one) is refused, naming both."""
    from registryd import FaultProxy

    layers = soci("--plain-http", "--root", str(tmp_path / "r0"), "create", image,
                  "--min-layer-size", "0")
    layer = layers.stdout.split()[1]
    with FaultProxy(registry.host) as proxy:
        proxy.corrupt(1, match=f"/blobs/{layer}")
        ref = image.replace(registry.host, proxy.host)
        proc = soci("--plain-http", "--root", str(tmp_path / "r1"), "create", ref,
                    "--min-layer-size", "0", "-q")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: layer {layer} of {ref} (linux/amd64): ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_retry_waits_say_what_they_wait_for(image: str, registry: Registry,
                                            tmp_path: Path) -> None:
    """Each wait before a retry prints one line on stderr (with -q too: it is a warning),
    naming the registry, why, how long and which retry; stdout keeps only results."""
    import re

    from registryd import FaultProxy, free_port

    port = free_port()
    proc = soci("--plain-http", "--root", str(tmp_path / "root"), "create", "-q",
                f"127.0.0.1:{port}/app:v1")
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    said = re.compile(rf"Warning: registry 127\.0\.0\.1:{port} unreachable \(connection "
                      r"refused\), retrying in \d+\.\d s \((\d)/5\)")
    waits = [said.fullmatch(line) for line in lines[:-1]]
    assert all(waits) and [int(m.group(1)) for m in waits] == [1, 2, 3, 4, 5], proc.stderr
    assert lines[-1].startswith(f"Error: 127.0.0.1:{port}/app:v1: cannot reach")
    # A registry that is busy for a moment: two waits said, then the work is done.
    with FaultProxy(registry.host) as proxy:
        proxy.fail(2, 503, match="/manifests/")
        ref = image.replace(registry.host, proxy.host)
        ok = soci("--plain-http", "--root", str(tmp_path / "root"), "create", "-q", ref,
                  "--min-layer-size", "0")
    assert ok.returncode == 0, ok.stderr
    assert [line.split(", retrying")[0] for line in ok.stderr.splitlines()] == [
        f"Warning: registry {proxy.host} answered HTTP 503"] * 2
    assert ok.stdout.startswith("sha256:")


def test_tables_print_short_digests(tmp_path: Path) -> None:
    """Tables show 12 hex digits (as podman images does), --no-trunc whole digests; -q and
    --json always whole."""
    import json

    layout = tmp_path / "layout"
    write_image(layout, "v1", [files_layer({"f": b"x" * 5000})])
    root = str(tmp_path / "root")
    assert soci("create", "--root", root, "--min-layer-size", "0",
                f"oci:{layout}:v1").returncode == 0
    for kind, second in (("index", "manifest_digest"), ("ztoc", "layer_digest")):
        record = json.loads(soci(kind, "ls", "--json", "--root", root).stdout)[0]
        full, other = record["digest"], record[second]
        assert soci(kind, "ls", "-q", "--root", root).stdout.split() == [full]
        table = soci(kind, "ls", "--root", root).stdout.splitlines()
        assert table[1].split()[0] == full[7:19] and other[7:19] in table[1].split()
        assert "sha256:" not in "".join(table)
        whole = soci(kind, "ls", "--no-trunc", "--root", root).stdout.splitlines()
        assert whole[1].split()[0] == full and other in whole[1].split()


def test_ref_filter_matches_the_names_create_wrote(image: str, registry: Registry,
                                                   tmp_path: Path) -> None:
    """--ref is normalised as create stored it: docker.io spellings, docker://, a relative or
    absolute oci: path; a ref that names nothing hints at the similar refs there are."""
    root = str(tmp_path / "root")
    layout = tmp_path / "layout"
    write_image(layout, "v1", [files_layer({"f": b"x" * 5000})])
    made = subprocess.run([sys.executable, "-m", "soci.cli", "--root", root, "create", "-q",
                           "--min-layer-size", "0", "oci:layout:v1"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    local = made.stdout.split()[0]
    for ref in (f"oci:{layout}:v1", f"oci:{tmp_path}/./layout:v1"):
        assert soci("index", "ls", "-q", "--ref", ref, "--root", root).stdout.split() == [local]
    pushed = soci("--plain-http", "--root", root, "create", "-q", "--min-layer-size", "0", image)
    remote = pushed.stdout.split()[0]
    for ref in (image, f"docker://{image}"):
        assert soci("index", "ls", "-q", "--ref", ref, "--root", root).stdout.split() == [remote]
    # The same repository and tag on Docker Hub is another image: nothing, and a hint.
    missed = soci("index", "ls", "-q", "--ref", "usab:v1", "--root", root)
    assert missed.stdout == ""
    assert missed.stderr.strip() == (f"Hint: no index for docker.io/library/usab:v1; there are "
                                     f"some for {image}")


def test_empty_database_over_content_hints_rebuild_db(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_image(layout, "v1", [files_layer({"f": b"x" * 5000})])
    root = tmp_path / "root"
    made = soci("create", "-q", "--root", str(root), "--min-layer-size", "0", f"oci:{layout}:v1")
    for f in root.glob("artifacts.sqlite3*"):
        f.unlink()
    empty = soci("index", "ls", "--root", str(root))
    assert empty.returncode == 0 and len(empty.stdout.splitlines()) == 1
    assert empty.stderr.strip() == (f"Hint: the database of {root} lists no SOCI index, but its "
                                    "content store has some: run soci rebuild-db")
    assert soci("rebuild-db", "--root", str(root)).returncode == 0
    again = soci("index", "ls", "-q", "--root", str(root))
    assert again.stdout.split() == made.stdout.split()[:1] and again.stderr == ""


def test_second_create_says_what_it_did_with_the_first(tmp_path: Path) -> None:
    """As upstream soci, a second create of one image (other span size) keeps the first index
    and says so in one line, with how to remove it; the new one is what push uses."""
    layout = tmp_path / "layout"
    write_image(layout, "v1", [files_layer({"f": b"x" * 50000})])
    root = str(tmp_path / "root")
    args = ("create", "--root", root, "--min-layer-size", "0", f"oci:{layout}:v1")
    first = soci(*args)
    assert first.returncode == 0 and first.stderr == ""
    second = soci(*args, "--span-size", "10000")
    assert second.returncode == 0, second.stderr
    old, new = first.stdout.split()[-6], second.stdout.split()[-6]
    assert old != new and old.startswith("sha256:")
    assert second.stderr.strip() == (
        f"Note: kept 1 earlier SOCI index(es) of this image ({old[7:19]}); push and soci-store "
        f"use the new one; soci index rm {old[7:19]} removes the old")
    assert sorted(soci("index", "ls", "-q", "--root", root).stdout.split()) == sorted([old, new])
    assert soci(*args, "-q").stderr == ""  # -q keeps it quiet


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_shell_completion(program: str) -> None:
    """Each entry point prints its bash, zsh and fish completion scripts, and completes a
    subcommand or option the way the scripts ask it to (COMP_WORDS/COMP_CWORD)."""
    import os

    exe = str(Path(sys.executable).parent / program)
    var = "_" + program.upper().replace("-", "_") + "_COMPLETE"
    func = "_" + program.replace("-", "_") + "_completion"
    for shell in ("bash", "zsh", "fish"):
        script = subprocess.run([exe], env={**os.environ, var: f"{shell}_source"},
                                capture_output=True, text=True, timeout=60)
        assert script.returncode == 0 and func in script.stdout, (shell, script.stderr)
    words, want = {"soci": ("soci ind", "plain,index"),
                   "soci-store": ("soci-store --ro", "plain,--root"),
                   "soci-snapshotter-grpc": ("soci-snapshotter-grpc --log-l",
                                             "plain,--log-level")}[program]
    done = subprocess.run([exe], env={**os.environ, var: "bash_complete", "COMP_WORDS": words,
                                      "COMP_CWORD": "1"},
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == [want], done.stderr
    if program == "soci":  # global options after a subcommand complete too
        opts = subprocess.run([exe], env={**os.environ, var: "bash_complete",
                                          "COMP_WORDS": "soci create --pl", "COMP_CWORD": "2"},
                              capture_output=True, text=True, timeout=60)
        assert "plain,--plain-http" in opts.stdout.splitlines()


def test_benchmarks_start_from_a_fresh_clone(tmp_path: Path) -> None:
    """bench/ as a fresh clone has it (no .data): the scripts make bench/.data, and one whose
    baseline libraries are missing says how to install them instead of a traceback."""
    import shutil

    bench = tmp_path / "bench"
    src = Path(__file__).resolve().parent.parent / "bench"
    shutil.copytree(src, bench, ignore=shutil.ignore_patterns(".data", "__pycache__"))
    layer = _gzip_tar(tmp_path / "tiny.tar.gz")
    made = subprocess.run([sys.executable, "-c", "import benchdata, sys; "
                           f"print(benchdata.ensure_layer({str(layer)!r}))"],
                          capture_output=True, text=True, timeout=60, cwd=bench)
    assert made.returncode == 0 and made.stdout.strip() == str(layer), made.stderr
    assert (bench / ".data").is_dir()
    shutil.rmtree(bench / ".data")
    proc = subprocess.run([sys.executable, str(bench / "bench_ztoc.py"), "--layer", str(layer),
                           "--repeat", "1", "--reads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert "FileNotFoundError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    import importlib.util
    if importlib.util.find_spec("indexed_gzip") is None:
        assert proc.returncode == 1 and "pip install -e '.[bench]'" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr


def test_archive_output_in_a_missing_directory_names_the_archive(tmp_path: Path) -> None:
    """convert to oci-archive: under a directory that does not exist names the archive, not
    the scratch directory it would have built it in."""
    layout = tmp_path / "layout"
    write_image(layout, "v1", [files_layer({"f": b"x" * 5000})])
    out = tmp_path / "nonexist" / "dir" / "x.tar"
    proc = soci("convert", "--root", str(tmp_path / "root"), "--min-layer-size", "0", "-q",
                f"oci:{layout}:v1", f"oci-archive:{out}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: No such file or directory: {out}"
    assert not (tmp_path / "nonexist").exists()
