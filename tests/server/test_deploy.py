"""deploy/: the Kubernetes manifests and Dockerfiles agree with the server they run (parsed offline).

The container arguments are parsed by `explainrt serve`'s own parser and a server is started with
them, so the probes are checked against the health service names that server really reports.
"""
from __future__ import annotations

import json
import os
import re
import shlex

import pytest

yaml = pytest.importorskip("yaml")

from explainrt.cli import build_parser  # noqa: E402
from explainrt.client import ExplainClient  # noqa: E402
from explainrt.server.app import DRAIN_SEND_S  # noqa: E402
from explainrt.server.cli import server_config  # noqa: E402
from explainrt.server.metrics import ServerMetrics  # noqa: E402
from explainrt.server.service import SERVICE_NAME  # noqa: E402
from serve_helpers import start_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")
STOP_AFTER_GRACE_S = DRAIN_SEND_S + 5.0  # ExplainServer.stop: the last responses, then the workers' join


def _documents(name: str) -> list[dict]:
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _one(name: str, kind: str) -> dict:
    docs = [d for d in _documents(name) if d["kind"] == kind]
    assert len(docs) == 1, (name, kind)
    return docs[0]


def _serve_args(argv: list[str]):
    return build_parser().parse_args(["serve", *argv])


def _memory_mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity).groups()
    return float(number) * (1024 if unit == "Gi" else 1)


@pytest.fixture(scope="module")
def deployment():
    return _one("deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def container(deployment):
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def args(container):
    return _serve_args(container["args"])  # an unknown or malformed flag fails here (argparse exits)


def test_kustomization_names_the_files_that_exist():
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        resources = yaml.safe_load(f)["resources"]
    assert resources == ["deployment.yaml", "service.yaml", "hpa.yaml"]
    assert all(os.path.exists(os.path.join(K8S, r)) for r in resources)


def test_ports_probes_and_grace_match_the_server(deployment, container, args):
    assert args.host in ("0.0.0.0", "[::]"), "a pod's server must listen beyond loopback"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.port, probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"]["service"] == container["startupProbe"]["grpc"]["service"] == ""
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == args.metrics_port and annotations["prometheus.io/path"] == "/metrics"
    # SIGTERM: the drain takes --grace plus the last responses and the workers' stop; the pod waits longer.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= args.grace + STOP_AFTER_GRACE_S
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > args.grace + STOP_AFTER_GRACE_S, \
        "a draining pod (health NOT_SERVING) would be restarted before its drain ends"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_resources_fit_the_server_settings(container, args):
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert int(requests["cpu"]) == args.threads, "ONNX Runtime's threads per model = the CPUs requested"
    assert args.memory_budget_mib < _memory_mib(limits["memory"]), "the request memory budget must fit the limit"
    assert _memory_mib(requests["memory"]) <= _memory_mib(limits["memory"])


def test_probed_health_services_are_the_ones_the_server_reports(container, args, single_model_dir):
    config = server_config(args)
    srv = start_server(single_model_dir, workers=config.workers, threads=config.threads,
                       memory_budget_mib=config.memory_budget_mib, max_connection_age_s=config.max_connection_age_s)
    try:
        with ExplainClient(f"127.0.0.1:{srv.port}", timeout=10) as client:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert client.health(container[probe]["grpc"]["service"]) == "SERVING", probe
    finally:
        srv.stop(grace=0)


def test_headless_service_selects_the_pods(deployment, container):
    service = _one("service.yaml", "Service")
    assert service["spec"]["clusterIP"] == "None", "headless: the name resolves to every pod for client balancing"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    names = {p["name"] for p in container["ports"]}
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in by_name.values()} <= names
    assert by_name["grpc"]["port"] == _serve_args(container["args"]).port


def test_autoscalers_target_the_deployment_on_metrics_that_exist(deployment, container):
    for name in ("hpa.yaml", "hpa-queue-depth.yaml"):
        hpa = _one(name, "HorizontalPodAutoscaler")
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (cpu,) = _one("hpa.yaml", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu" and "cpu" in container["resources"]["requests"]
    (queue,) = _one("hpa-queue-depth.yaml", "HorizontalPodAutoscaler")["spec"]["metrics"]
    prom = pytest.importorskip("prometheus_client")
    exported = prom.generate_latest(ServerMetrics(lambda: 0, lambda: 0).registry).decode()
    assert re.search(rf"^{queue['pods']['metric']['name']} ", exported, re.M), "the server exports no such gauge"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_run_the_server_as_the_manifests_expect(name, args):
    with open(os.path.join(DEPLOY, name)) as f:
        text = f.read()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    cmd = _serve_args(json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1)))
    assert entrypoint == ["explainrt", "serve"]
    exposed = {int(p) for p in shlex.split(re.search(r"^EXPOSE (.*)$", text, re.M).group(1))}
    assert exposed == {cmd.port, cmd.metrics_port} == {args.port, args.metrics_port}
    assert cmd.models == args.models and cmd.host == args.host and cmd.grace == args.grace
    assert re.search(r"^COPY .*\$\{MODELS\}/ /models/$", text, re.M) and args.models == "/models"
    if name == "Dockerfile.cuda":
        assert cmd.device == "cuda"
