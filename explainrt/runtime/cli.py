"""`explainrt build`: a TensorRT plan from an exported ONNX model (plugged into explainrt.cli)."""
from __future__ import annotations

import os

from ..errors import InvalidInputError


def cmd_build(args) -> int:
    from .tensorrt_build import build_plan, default_plan_path

    if args.max_batch < 1:
        raise InvalidInputError(f"--max-batch must be at least 1, got {args.max_batch}")
    if not args.model.endswith(".onnx"):
        raise InvalidInputError(f"expected an exported .onnx model, got {args.model}")
    output = args.output or default_plan_path(args.model, args.max_batch, args.fp16)
    info = build_plan(args.model, output, max_batch=args.max_batch, fp16=args.fp16, opt_batch=args.opt_batch,
                      workspace_gb=args.workspace_gb, timing_cache=args.timing_cache, tf32=args.tf32)
    build = info["build"]
    batches = f"fixed batch {build['fixed_batch']}" if build.get("fixed_batch") else f"batch 1..{build['max_batch']}"
    print(f"wrote {output} ({'fp16' if build['fp16'] else 'fp32'}{', tf32' if build['tf32'] else ''}, {batches}, "
          f"opt {build['opt_batch']}, TensorRT {build['tensorrt']}, {build['build_seconds']} s) "
          f"and {os.path.basename(output)}.json")
    return 0


def register(subparsers) -> None:
    """Add the `build` subcommand."""
    p = subparsers.add_parser("build", help="build a TensorRT plan from an exported ONNX model")
    p.add_argument("model", help="exported .onnx model (from `explainrt export`)")
    p.add_argument("-o", "--output", help="output .plan (default: MODEL.b<max-batch>.<fp16|fp32>.plan)")
    p.add_argument("--fp16", action="store_true", help="half precision (TensorRT 11: via an FP16 ONNX copy)")
    p.add_argument("--tf32", action="store_true",
                   help="let FP32 layers use TF32 (faster on Ampere+, ~1e-3 off; default: full FP32, recorded in the .json)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the plan accepts (default 64)")
    p.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT tunes for (default: --max-batch)")
    p.add_argument("--workspace-gb", type=float, default=None, help="builder workspace limit in GiB")
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: trt_timing.cache beside the plan)")
    p.set_defaults(func=cmd_build)
