"""Build the Cython core.

``zran`` links zlib: the system's by default, or a static zlib-ng (built in
zlib-compatible mode) when ``SOCI_ZLIB_PREFIX`` names its install prefix.
zlib-ng inflates about twice as fast; ``ci/build-zlib-ng.sh`` builds it from
the PyPI source distribution of the ``zlib-ng`` package. Its symbols are kept
private to the extension so they never mix with the system zlib that
CPython's own ``zlib`` module has loaded.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup


LOCAL_ZLIB_NG = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".build", "zlib-ng",
                             "prefix")


def zlib_options() -> dict:
    """zlib-ng when SOCI_ZLIB_PREFIX names it or ci/build-zlib-ng.sh has built it, else system."""
    prefix = os.environ.get("SOCI_ZLIB_PREFIX")
    if not prefix and os.environ.get("SOCI_ZLIB") != "system":
        if os.path.exists(os.path.join(LOCAL_ZLIB_NG, "lib", "libz.a")):
            prefix = LOCAL_ZLIB_NG
    if not prefix:
        return {"libraries": ["z"]}
    static = os.path.join(prefix, "lib", "libz.a")
    if not os.path.exists(static):
        raise SystemExit(f"SOCI_ZLIB_PREFIX={prefix}: {static} not found")
    return {
        "include_dirs": [os.path.join(prefix, "include")],
        "extra_objects": [static],
        "extra_link_args": ["-Wl,--exclude-libs,ALL"],
    }


def native(name: str, **options: object) -> Extension:
    return Extension(
        f"soci._native.{name}",
        [f"src/soci/_native/{name}.pyx"],
        extra_compile_args=["-O3"],
        **options,
    )


setup(
    ext_modules=cythonize(
        [native("zran", **zlib_options()), native("tarscan"), native("flatbuf")],
        compiler_directives={"language_level": "3"},
        include_path=["src"],
    ),
)
