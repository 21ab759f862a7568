"""Build the Cython core against the system zlib."""

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = ["zran", "tarscan", "flatbuf"]

extensions = [
    Extension(
        f"soci._native.{name}",
        [f"src/soci/_native/{name}.pyx"],
        libraries=["z"],
        extra_compile_args=["-O3"],
    )
    for name in NATIVE
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3"},
        include_path=["src"],
    ),
)
