"""containerd's gRPC API: our own .proto files (interface facts only) and their generated stubs
(``ci/gen-proto.sh`` regenerates them)."""
