"""Cython hot paths: gzip checkpoints (zran), tar scanning, the zTOC FlatBuffer."""
