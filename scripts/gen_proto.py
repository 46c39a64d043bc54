#!/usr/bin/env python
"""Regenerate the checked-in gRPC stubs under explainrt/proto/ with grpc_tools.protoc.

    python scripts/gen_proto.py            # rewrite explainrt/proto/explainrt/v1/*_pb2*.py(i)
    python scripts/gen_proto.py --out DIR  # write into DIR instead (the stubs test diffs that)

protoc runs with ``-I explainrt/proto`` so the proto's canonical name stays
``explainrt/v1/explainrt.proto`` (package ``explainrt.v1``, what reflection and other languages see).
The grpc plugin then writes ``from explainrt.v1 import explainrt_pb2``, which inside this package
would resolve against the top-level ``explainrt`` package and fail; that one import is rewritten
to a relative ``from . import explainrt_pb2``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_ROOT = os.path.join(ROOT, "explainrt", "proto")
PROTO_FILES = ["explainrt/v1/explainrt.proto"]


def _relative_imports(path: str) -> None:
    """Turn ``from explainrt.v1 import x_pb2`` into ``from . import x_pb2`` in one generated file."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    fixed, count = re.subn(r"^from explainrt\.v1 import (\w+_pb2)", r"from . import \1", text, flags=re.M)
    if path.endswith("_grpc.py") and count == 0:
        raise SystemExit(f"gen_proto: expected an import of the pb2 module in {path}; the grpc plugin changed")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(fixed)


def generate(out_root: str) -> list[str]:
    """Run protoc for every proto file into ``out_root`` (mirroring explainrt/proto); return the files written."""
    import importlib.resources

    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    os.makedirs(out_root, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise SystemExit("gen_proto: protoc failed (see the message above)")
    written = []
    for proto in PROTO_FILES:
        stem = os.path.join(out_root, proto[: -len(".proto")])
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            _relative_imports(stem + suffix)
            written.append(stem + suffix)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=PROTO_ROOT, help="output root (default: explainrt/proto, in place)")
    args = parser.parse_args(argv)
    for path in generate(os.path.abspath(args.out)):
        print(os.path.relpath(path, ROOT) if path.startswith(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
