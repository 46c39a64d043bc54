"""`explainrt serve` and `explainrt client` (registered through explainrt.cli.COMMAND_MODULES)."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from ..errors import InvalidInputError, ModelError, require

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the `serve` and `client` subcommands."""
    from ..cli import add_request_options, at_least_one, non_negative_int, port_number, positive_float, positive_int
    from .config import ServerConfig  # light: no grpc import until a command runs

    d = ServerConfig(models="")
    p = subparsers.add_parser("serve", help="serve explanations over gRPC (health, reflection, Prometheus metrics)")
    p.add_argument("--models", required=True, help="directory of exported .onnx models (name = file stem)")
    p.add_argument("--host", default=d.host,
                   help=f"address to bind (default {d.host}: this machine only; [::] or 0.0.0.0 for every interface)")
    p.add_argument("--port", type=port_number, default=d.port, help=f"gRPC port (default {d.port}; 0 picks a free one)")
    p.add_argument("--metrics-port", type=port_number, default=None, help="serve Prometheus /metrics on this HTTP port")
    p.add_argument("--workers", type=positive_int, default=d.workers,
                   help=f"expensive explanations run at once (default {d.workers})")
    p.add_argument("--cheap-workers", type=non_negative_int, default=d.cheap_workers,
                   help=f"more threads for cheap requests only (--cheap-passes), which run several at once and share "
                        f"engine batches (default {d.cheap_workers})")
    p.add_argument("--queue-size", type=positive_int, default=d.queue_size,
                   help=f"requests that may wait for a worker; more get RESOURCE_EXHAUSTED (default {d.queue_size})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"masked images per engine call (default {d.batch_size}); larger requests are chunked")
    p.add_argument("--backend", default=d.backend, choices=("onnxruntime", "torch", "tensorrt"),
                   help=f"engine that runs the models (default {d.backend})")
    p.add_argument("--device", default=d.device, choices=("cpu", "cuda"), help=f"where they run (default {d.device})")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads per model")
    p.add_argument("--ort-spinning", action="store_true",
                   help="let ONNX Runtime threads busy-wait between runs (default off: they starve the server's "
                        "other threads on small machines)")
    p.add_argument("--max-masks", type=positive_int, default=d.max_masks,
                   help=f"largest RISE n_masks per request (default {d.max_masks})")
    p.add_argument("--max-targets", type=positive_int, default=d.max_targets,
                   help=f"most classes explained per request (default {d.max_targets})")
    p.add_argument("--max-megapixels", type=at_least_one, default=d.max_pixels / 1e6,
                   help=f"largest decoded image in megapixels (default {d.max_pixels / 1e6:.0f})")
    p.add_argument("--max-message-mib", type=positive_int, default=d.max_receive_mib,
                   help=f"largest request in MiB (default {d.max_receive_mib}: a 4K PNG or raw RGB image fits)")
    p.add_argument("--grace", type=float, default=d.grace_s,
                   help=f"seconds in-flight requests get to finish on SIGTERM (default {d.grace_s:g})")
    p.add_argument("--max-connection-age", type=positive_float, default=None, metavar="SECONDS",
                   help="close each client connection after this long (its calls finish first), so that clients "
                        "balancing over a DNS name re-resolve it and find new replicas (default: never)")
    p.add_argument("--replica-name", default=None, metavar="NAME",
                   help="this server's name in the explainrt-replica metadata of its answers, which tells a "
                        "client balancing over several servers who answered (default HOSTNAME:PORT)")
    p.add_argument("--memory-budget-mib", type=positive_int, default=d.memory_budget_mib,
                   help=f"memory that all running requests may hold together; a request waits until its share fits, "
                        f"one that can never fit is refused (default {d.memory_budget_mib})")
    p.add_argument("--max-calls", type=positive_int, default=d.max_calls,
                   help=f"Explain/ExplainStream calls open at once; more get RESOURCE_EXHAUSTED, health and metadata "
                        f"RPCs always get through (default {d.max_calls})")
    p.add_argument("--max-queue-delay-ms", type=_queue_delay, default=d.max_queue_delay_ms,
                   help=f"cross-request batching: how long an engine batch with room waits for other requests' calls "
                        f"(default {d.max_queue_delay_ms:g}; 0: only what already waits; 'off': no batching)")
    p.add_argument("--cheap-passes", type=positive_int, default=d.cheap_passes,
                   help=f"requests of at most this many forward passes are cheap: they run first and have "
                        f"--cheap-workers threads of their own (default {d.cheap_passes}: FEM)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (chain) of the server: serve TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--auth-token-file", default=None,
                   help="file holding a bearer token every RPC but the health service must send "
                        "('authorization: Bearer TOKEN'); others get UNAUTHENTICATED")
    p.add_argument("--log-format", default="kv", choices=("kv", "json"), help="structured log lines (default kv)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("client", help="explain images on a running server (writes what `explain` writes)")
    p.add_argument("images", nargs="*", help="image files, or directories of them")
    p.add_argument("--url", required=True,
                   help="server address HOST:PORT; several replicas: HOST:PORT,HOST:PORT,... or dns:///NAME:PORT "
                        "(every address of NAME, e.g. a Kubernetes headless Service), balanced round robin")
    p.add_argument("--model", default=None, help="model name (default: the server's only model)")
    add_request_options(p)
    p.add_argument("--timeout", type=positive_float, default=None, help="seconds for the whole run (default: none)")
    p.add_argument("--priority", type=int, default=0, choices=range(-10, 11), metavar="-10..10",
                   help="scheduling priority on the server: higher runs first among waiting requests (default 0)")
    p.add_argument("--list-models", action="store_true", help="print the server's models and exit (--json: as JSON)")
    p.add_argument("--send-tensor", action="store_true",
                   help="decode each image here and send its raw uint8 H×W×3 pixels (default: the file's bytes; "
                        "formats other than PNG/JPEG are converted to PNG either way)")
    p.add_argument("--health", action="store_true", help="print the server's health status and exit")
    tls = p.add_argument_group("TLS and authentication")
    tls.add_argument("--tls-ca", default=None, metavar="PEM",
                     help="CA certificate that signed the server's certificate (turns TLS on)")
    tls.add_argument("--tls", action="store_true", help="TLS with the system's root certificates (no --tls-ca)")
    tls.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate, for mutual TLS")
    tls.add_argument("--tls-key", default=None, metavar="PEM", help="the client certificate's private key")
    tls.add_argument("--tls-server-name", default=None, metavar="NAME",
                     help="name the server's certificate must carry, when not the host of --url")
    tls.add_argument("--token-file", default=None, metavar="FILE",
                     help="file holding the server's bearer token (default: $EXPLAINRT_TOKEN, if set)")
    p.set_defaults(func=cmd_client)


def _queue_delay(text: str):
    """--max-queue-delay-ms: milliseconds in 0..1000, or 'off' (None: no cross-request batching)."""
    from ..cli import _bounded

    return None if text.strip().lower() == "off" else _bounded(float, 0, 1000, bounds="milliseconds in 0..1000 or 'off'")(text)


def server_config(args) -> "ServerConfig":
    """The ``ServerConfig`` of parsed `explainrt serve` arguments."""
    from .config import ServerConfig

    return ServerConfig(
        models=args.models, host=args.host, port=args.port, metrics_port=args.metrics_port, workers=args.workers,
        cheap_workers=args.cheap_workers, queue_size=args.queue_size, batch_size=args.batch_size,
        backend=args.backend, device=args.device, threads=args.threads, ort_spinning=args.ort_spinning,
        max_receive_mib=args.max_message_mib, max_send_mib=max(args.max_message_mib, 256), max_masks=args.max_masks,
        max_targets=args.max_targets, max_pixels=int(args.max_megapixels * 1e6), grace_s=args.grace,
        replica_name=args.replica_name, max_connection_age_s=args.max_connection_age,
        memory_budget_mib=args.memory_budget_mib, max_calls=args.max_calls, max_queue_delay_ms=args.max_queue_delay_ms,
        cheap_passes=args.cheap_passes, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, auth_token_file=args.auth_token_file)


def cmd_serve(args) -> int:
    require("grpc", "serve", "`explainrt serve`")
    import warnings

    from ..api import ConstantMapWarning
    from . import logs
    from .app import ExplainServer
    from .security import exposure_warning, security_summary

    logs.configure(args.log_format, logging.INFO)
    warnings.simplefilter("ignore", ConstantMapWarning)  # a client's own result shows its constant map
    config = server_config(args)
    server = ExplainServer(config)
    if not server.models.candidates():  # fail before "listening on": nothing would ever be served
        raise ModelError(f"no exported model could be loaded from {args.models} (no *.onnx files); export one "
                         "with `explainrt export ... -o DIR/NAME.onnx`")
    server.install_signal_handlers()
    server.start(load=False)
    batching = "off" if config.max_queue_delay_ms is None else f"{config.max_queue_delay_ms:g} ms"
    metrics_host = "0.0.0.0" if args.host in ("[::]", "0.0.0.0") else args.host  # where app.py binds it
    print(f"explainrt serve: listening on {args.host}:{server.port} ({security_summary(config)}; batching {batching})"
          + (f", metrics on http://{metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else ""),
          flush=True)
    warning = exposure_warning(config.host, config)
    if warning:
        print(f"explainrt serve: warning: {warning}", file=sys.stderr, flush=True)
    try:
        names = server.load_models()
    except Exception:
        server.stop(grace=0)
        raise
    print(f"explainrt serve: serving {', '.join(names)}", flush=True)
    server.wait_for_signals()
    return 0


def cmd_client(args) -> int:
    require("grpc", "serve", "`explainrt client`")
    from ..cli import (ProgressBar, RunRecord, methods_for_model, params_by_method, parse_params, write_explanation,
                       write_run_index)
    from ..client import ExplainClient, RemoteError
    from ..imaging import check_image_path, read_image
    from ..outputs import dumps, expand_image_dirs, output_stems, parse_methods, prepare_output_dir

    from ..credentials import read_token_file

    token = read_token_file(args.token_file, "--token-file") if args.token_file else None  # None: $EXPLAINRT_TOKEN
    with ExplainClient(args.url, timeout=args.timeout, model=args.model, tls=args.tls, tls_ca=args.tls_ca,
                       tls_cert=args.tls_cert, tls_key=args.tls_key, tls_server_name=args.tls_server_name,
                       token=token) as client:
        if args.health:
            status = client.health(args.model or "")
            print(status)
            return 0 if status == "SERVING" else 1
        if args.list_models:
            models = client.list_models()
            for model in models:
                if args.json:
                    print(dumps({**model, "input_size": list(model["input_size"])}))
                else:
                    print(f"{model['name']:<24} {model['input_size'][0]}x{model['input_size'][1]} "
                          f"{model['num_classes']} classes ({model['backend']}, {model['device']})")
            return 0
        if not args.images:
            raise InvalidInputError("give one or more image files (or --list-models / --health)")
        methods = parse_methods(args.method)
        params = params_by_method(parse_params(args.param), methods)
        if "all" in args.method.split(","):  # what the server's model cannot run is skipped (a black box)
            meta = client.metadata(args.model)
            methods = methods_for_model(args.method, methods, meta.get("name"), lambda m: m in meta["methods"])
        images = expand_image_dirs(args.images)
        stems = output_stems(images)
        targets = _client_targets(client, args)
        prepare_output_dir(args.output)
        for path in images:
            check_image_path(path)  # a missing file or a directory fails before any request
        jobs = [(path, stem, method) for path, stem in zip(images, stems) for method in methods]
        requests = ({"image": read_image(path) if args.send_tensor else path, "method": method, "target": targets,
                     "params": params[method], "request_id": f"{os.path.basename(path)}:{method}",
                     "priority": args.priority}
                    for path, _stem, method in jobs)
        show_bar = not args.no_progress
        bars: dict[int, ProgressBar] = {}

        def progress(index: int, done: int, total: int) -> None:
            _path, stem, method = jobs[index]
            bars.setdefault(index, ProgressBar(f"{stem} {method}", show_bar))(done, total)

        run = RunRecord()
        original = (None, None)  # (path, RGB) of the image being written: results come in job order
        t_start = time.perf_counter()
        for item in client.stream(requests, progress=progress, timeout=args.timeout):
            if item.index in bars:
                bars.pop(item.index).close()
            path, stem, method = jobs[item.index]
            if isinstance(item, RemoteError):
                if len(jobs) == 1:
                    raise item
                print(f"explainrt: error: {path} ({method}): {item}", file=sys.stderr)
                run.failures += 1
                continue
            if original[0] != path:
                original = (path, read_image(path))
                run.originals.setdefault(stem, original[1])
            # The server's time on this item: a stream's items are all sent at once and wait for each
            # other in its queue, so the end-to-end latency would add up the items before it.
            seconds = sum(item.timings[k] for k in ("preprocess_s", "base_pass_s", "explain_s", "postprocess_s"))
            write_explanation(args, path, stem, method, item.targets, item.labels, item.probabilities,
                              item.saliency_maps.astype("float32"), original[1], item.visualization,
                              item.forward_passes, seconds, [[c, round(p, 6)] for c, p in item.top_k(5)], run,
                              replica=item.replica if args.json or client.balanced else "")
        log.info("event=client_done items=%d failures=%d seconds=%.3f", len(jobs), run.failures,
                 time.perf_counter() - t_start)
        write_run_index(args, run, f"explainrt client: {args.url}", [f"method {args.method}; times are the server's"])
    return 1 if run.failures else 0


def _client_targets(client, args):
    """`--target` as class indices; label names are looked up in the server's model metadata."""
    from ..cli import resolve_targets

    if not args.target:
        return None
    if all(part.strip().isdigit() for value in args.target for part in value.split(",")):
        return resolve_targets(args.target, None)
    meta = client.metadata(args.model)
    return resolve_targets(args.target, meta.get("labels"), meta.get("num_classes"))

