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
