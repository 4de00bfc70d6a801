"""Generated protobuf and gRPC code for sagaplane.v1 (scripts/generate; never edit)."""
