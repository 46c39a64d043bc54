"""Protocol buffers of the explainrt gRPC API and their generated stubs (scripts/gen_proto.py)."""
