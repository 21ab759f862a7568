"""Build the Cython core.

``zstdframes`` links libzstd (statically when libzstd.a is installed). ``zran`` links zlib: a static zlib-ng (built in zlib-compatible mode) by
default, since it inflates about twice as fast, or the system's. The zlib-ng
install prefix is, in order: ``SOCI_ZLIB_PREFIX``; ``.build/zlib-ng/prefix``
when ``ci/build-zlib-ng.sh`` has built it; or, when cmake is on PATH, a fresh
build by that script (from the PyPI source distribution of ``zlib-ng``) during
this build. Without cmake, or when that build fails, the core links the
system zlib and the build says so once. ``SOCI_ZLIB=system`` opts out of
zlib-ng. zlib-ng's symbols are kept private to the extension so they never mix
with the system zlib that CPython's own ``zlib`` module has loaded.
"""

import os
import shutil
import subprocess
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL_ZLIB_NG = os.path.join(HERE, ".build", "zlib-ng", "prefix")
BUILD_SCRIPT = os.path.join(HERE, "ci", "build-zlib-ng.sh")
HOW_TO_FAST = (
    "for the fast core install a soci wheel, or install cmake (and network access to PyPI) "
    "and rebuild, or run ci/build-zlib-ng.sh and set SOCI_ZLIB_PREFIX to the prefix it prints"
)


def say(message: str) -> None:
    """One line on stderr, which pip shows (with -v) and build tools show always."""
    print(f"soci build: {message}", file=sys.stderr, flush=True)


def build_zlib_ng() -> str | None:
    """Build zlib-ng with ci/build-zlib-ng.sh; its prefix, or None (and why) when it cannot."""
    if not os.path.exists(BUILD_SCRIPT):
        return None
    if shutil.which("cmake") is None:
        say(f"cmake not found: linking the SYSTEM zlib (zTOC builds take about 1.5x as long); "
            f"{HOW_TO_FAST}")
        return None
    # pip's isolated build environment hides the interpreter's own site-packages (and pip)
    # through PYTHONPATH; the script downloads with pip, so it runs without that overlay.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    env.setdefault("PYTHON", sys.executable)
    say("building zlib-ng for the fast core (cmake; SOCI_ZLIB=system skips this)")
    done = subprocess.run(["bash", BUILD_SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
    prefix = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not os.path.exists(os.path.join(prefix, "lib", "libz.a")):
        say(f"building zlib-ng failed (see above): linking the SYSTEM zlib (zTOC builds take "
            f"about 1.5x as long); {HOW_TO_FAST}")
        return None
    return prefix


# setuptools runs this file for metadata (egg_info, dist_info, sdist) as well as for the build;
# only a build links zran, so only a build makes zlib-ng or speaks about it (once).
BUILDING = any(
    cmd in sys.argv[1:]
    for cmd in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install")
)


def zlib_options() -> dict:
    """Compile and link options for zran: static zlib-ng wherever possible, else system zlib."""
    if not BUILDING:
        return {"libraries": ["z"]}
    prefix = os.environ.get("SOCI_ZLIB_PREFIX")
    if not prefix:
        if os.environ.get("SOCI_ZLIB") == "system":
            say("SOCI_ZLIB=system: linking the system zlib")
            return {"libraries": ["z"]}
        if os.path.exists(os.path.join(LOCAL_ZLIB_NG, "lib", "libz.a")):
            prefix = LOCAL_ZLIB_NG
        else:
            prefix = build_zlib_ng()
            if prefix is None:
                return {"libraries": ["z"]}
    static = os.path.join(prefix, "lib", "libz.a")
    if not os.path.exists(static):
        raise SystemExit(f"SOCI_ZLIB_PREFIX={prefix}: {static} not found")
    say(f"linking zlib-ng statically from {prefix}")
    return {
        "include_dirs": [os.path.join(prefix, "include")],
        "extra_objects": [static],
        "extra_link_args": ["-Wl,--exclude-libs,ALL"],
    }


def zstd_options() -> dict:
    """Compile and link options for zstdframes: libzstd linked statically when its archive is
    found (so the wheel vendors no shared library), else the system's shared libzstd.

    ``SOCI_ZSTD_STATIC`` names the archive (``libzstd.a``); by default the one libzstd-dev
    installs is used. ``SOCI_ZSTD=system`` links the shared library instead.
    """
    if not BUILDING or os.environ.get("SOCI_ZSTD") == "system":
        return {"libraries": ["zstd"]}
    candidates = [os.environ.get("SOCI_ZSTD_STATIC", "")]
    candidates += [os.path.join(d, "libzstd.a")
                   for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                             "/usr/lib64", "/usr/lib", "/usr/local/lib")]
    for static in candidates:
        if static and os.path.exists(static):
            say(f"linking libzstd statically from {static}")
            return {"extra_objects": [static], "extra_link_args": ["-Wl,--exclude-libs,ALL"]}
    say("libzstd.a not found: linking the shared libzstd (install libzstd-dev for a static link)")
    return {"libraries": ["zstd"]}


def native(name: str, **options: object) -> Extension:
    return Extension(
        f"soci._native.{name}",
        [f"src/soci/_native/{name}.pyx"],
        extra_compile_args=["-O3"],
        **options,
    )


setup(
    ext_modules=cythonize(
        [native("zran", **zlib_options()), native("tarscan"), native("flatbuf"),
         native("zstdframes", **zstd_options())],
        compiler_directives={"language_level": "3"},
        include_path=["src"],
    ),
)
