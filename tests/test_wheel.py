"""The wheel as a user meets it: installed into a fresh venv without a compiler.

``ci/build-wheel.sh`` (which ``ci/test.sh`` runs before pytest) leaves the manylinux wheel in
``dist/``. Here it goes into a new venv with ``--only-binary :all:``, so nothing may be compiled
(pyfuse3, which publishes no wheels, comes from the wheel that script builds into
``.build/wheelhouse``); then ``soci --version`` must name zlib-ng, and the zTOC tests run
against the installed package from a directory outside the source tree, so ``src/`` is never
imported.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
WHEELHOUSE = ROOT / ".build" / "wheelhouse"


def built_wheel() -> Path:
    """The one wheel ci/build-wheel.sh left in dist/; fail (never skip) when there is none."""
    wheels = sorted(DIST.glob("soci-*-manylinux*.whl"))
    assert len(wheels) == 1, (
        f"expected one manylinux soci wheel in {DIST}, found {[w.name for w in wheels]}: "
        f"run ci/build-wheel.sh first (ci/test.sh does)"
    )
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the built wheel and the test tools, installed from binaries only."""
    wheel = built_wheel()
    assert list(WHEELHOUSE.glob("pyfuse3-*.whl")), (
        f"no pyfuse3 wheel in {WHEELHOUSE}: run ci/build-wheel.sh first"
    )
    env_dir = tmp_path_factory.mktemp("wheel-venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--only-binary", ":all:", "--find-links", str(WHEELHOUSE),
         str(wheel), "pytest", "hypothesis", "flatbuffers"],
        check=True,
    )
    return env_dir


def test_wheel_is_manylinux_with_only_our_extensions() -> None:
    """auditwheel tagged it manylinux, and nothing else (no pyfuse3, no libz) was vendored."""
    import zipfile

    with zipfile.ZipFile(built_wheel()) as zf:
        names = zf.namelist()
    shared = sorted(n for n in names if ".so" in Path(n).name)
    assert [Path(n).name.split(".")[0] for n in shared] == ["flatbuf", "tarscan", "zran",
                                                               "zstdframes"], shared
    assert all(n.startswith("soci/_native/") for n in shared), shared
    assert not [n for n in names if n.startswith(("pyfuse3", "soci.libs/"))], names


def test_installed_soci_version_names_zlib_ng(wheel_venv: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(wheel_venv / "bin" / "soci"), "--version"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    assert "zlib-ng" in done.stdout, done.stdout
    where = subprocess.run(
        [str(wheel_venv / "bin" / "python"), "-c", "import soci; print(soci.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert where.startswith(str(wheel_venv)), where


def test_ztoc_tests_pass_against_installed_wheel(wheel_venv: Path, tmp_path: Path) -> None:
    """tests/test_ztoc_build.py, run by the venv's python from outside the source tree."""
    done = subprocess.run(
        [str(wheel_venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), str(ROOT / "tests" / "test_ztoc_build.py")],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout, done.stdout[-2000:]
    # The source tree's interpreter is not the one that ran them.
    assert str(wheel_venv) != sys.prefix
