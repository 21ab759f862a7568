"""soci: lazily load unmodified OCI images with SOCI indexes, for podman and friends."""

__version__ = "0.1.0"

#: Written into every zTOC we build (upstream writes "AWS SOCI CLI v0.2").
BUILD_TOOL_IDENTIFIER = f"soci-py v{__version__}"
