"""Protocol buffers of the explainrt gRPC API and their generated stubs (scripts/gen_proto.py)."""

#: the gRPC service's full name (server handlers, client service config, health checks)
SERVICE_NAME = "explainrt.v1.ExplainService"
#: response metadata in which a server names itself (its --replica-name), read by balanced clients
REPLICA_KEY = "explainrt-replica"
