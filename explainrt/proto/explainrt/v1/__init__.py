"""explainrt.v1 messages (explainrt_pb2) and service stubs (explainrt_pb2_grpc), generated: do not edit."""
