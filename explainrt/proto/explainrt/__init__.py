"""Generated stubs, package layout mirroring the proto package explainrt.v1."""
