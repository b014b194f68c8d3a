"""`tritonhf deploy kubernetes`, checked offline: every kustomization renders with the real kubectl (kustomize),
every object validates against Kubernetes' own schemas (kubernetes-validate) or its CRD's schema (KServe,
Prometheus Operator: ../shared/k8s-schemas), and the semantics schemas can't see hold: probes on the right ports
and paths, /dev/shm, selectors, the HPA's metric, credentials only from Secrets, the supervisor as entry point.

What needs a real cluster (scheduling, the adapter serving the metric, KServe's controllers) is not checked here;
test_loopback.py plays the Service and its readiness on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tritonhf import TritonHFError, cli, storage
from tritonhf.kubernetes import GPU_TOLERATIONS, PRESTOP_S, DeployOptions, Pod, peer, queue_time_query
from tritonhf.repo_builder import BuildOptions, build, plan
from tritonhf.repository import sealed_id
from tritonhf.server import UNLOAD_S, TritonServer
from tritonhf.sizing import Facts, Model, read_facts

from .conftest import CLASSIFIER, GEN_MAX_LEN
from .helpers import PROMPTS, alone, metric, until

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(os.environ.get("TRITONHF_K8S_SCHEMAS") or ROOT.parent / "shared" / "k8s-schemas")
# The oldest Kubernetes the manifests need (the preStop sleep action and the PDB's unhealthyPodEvictionPolicy are
# on by default since 1.30; kubectl here is 1.32) and the newest kubernetes-validate knows.
VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
CORE_KINDS = {
    "Deployment",
    "Service",
    "ServiceAccount",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ConfigMap",
    "NetworkPolicy",
}
COUNTS = {"": 7, "overlays/gpu": 7, "overlays/kserve": 5}
URIS = {
    "s3-endpoint": "s3://minio.storage:9000/models/prod/repo",
    "s3-aws": "s3://my-models/prod/repo",
    "gs": "gs://my-models/prod/repo",
    "as": "as://account/container/prod/repo",
    "pvc": "pvc://models-claim/prod/repo",
    "image": "/models",
}
SECRET_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY"}
Objects = list[dict[str, Any]]


REQUIRE = "TRITONHF_REQUIRE_K8S"  # set (by .ci/run): a missing kubectl or schema directory fails instead of skipping
KUBECTL = (1, 32)


def missing(reason: str) -> NoReturn:
    """These tests need tools a user's machine may lack: skip with the reason, except where CI says they must run."""
    if os.environ.get(REQUIRE):
        pytest.fail(f"{reason} ({REQUIRE} is set: these tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl")
    install = "https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/"
    if found is None:
        missing(
            f"kubectl >= {'.'.join(map(str, KUBECTL))} renders the manifests and is not on PATH: install it ({install})"
        )
    done = subprocess.run([found, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    version = json.loads(done.stdout or "{}").get("clientVersion", {}).get("gitVersion", "unknown")
    have = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if have < KUBECTL:
        missing(f"kubectl {version} is older than {'.'.join(map(str, KUBECTL))}: install a newer one ({install})")
    return found


@pytest.fixture(scope="session")
def schemas() -> Path:
    if not SCHEMAS.is_dir():
        missing(
            f"no CRD schemas at {SCHEMAS}: the KServe and Prometheus-Operator schemas live in ../shared/k8s-schemas"
            " beside the repository (or set TRITONHF_K8S_SCHEMAS to their directory)"
        )
    return SCHEMAS


@pytest.fixture(scope="module")
def deployed(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tritonhf deploy kubernetes` through the CLI, sized from the session's repository; one output per call."""

    def deploy(uri: str, *extra: str) -> Path:
        output = tmp_path_factory.mktemp("deploy") / "k8s"
        argv = ["deploy", "kubernetes", "--model-repository", uri, "--built", str(repository), "--output", str(output)]
        assert cli.main([*argv, *extra]) == 0
        return output

    return deploy


def render(kubectl: str, directory: Path) -> Objects:
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [body for body in yaml.safe_load_all(done.stdout) if body]


def validate(body: dict[str, Any], schemas: Path) -> str:
    """Core kinds against Kubernetes' schemas, the rest against their CRD's schema; strict: unknown fields fail."""
    if body["kind"] in CORE_KINDS:
        for version in VERSIONS:
            kubernetes_validate.validate(body, version, strict=True)
        return f"kubernetes {'/'.join(VERSIONS)}"
    group, version = body["apiVersion"].split("/")
    schema = schemas / f"{body['kind'].lower()}-{group.split('.')[0]}-{version}.json"
    jsonschema.Draft7Validator(strict(json.loads(schema.read_text()))).validate(body)
    return schema.name


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server prunes (or, with strict field validation,
    rejects) them: every object with ``properties`` closed, but for metadata (checked by the API server)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        closed.setdefault("additionalProperties", False)
        closed["properties"] = {key: strict(value) for key, value in schema["properties"].items()}
    return closed


def test_crd_validation_refuses_a_misspelt_field(schemas: Path) -> None:
    service = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "x"}}
    validate({**service, "spec": {"predictor": {"minReplicas": 1}}}, schemas)
    with pytest.raises(jsonschema.ValidationError, match="storageURI"):
        validate({**service, "spec": {"predictor": {"model": {"storageURI": "s3://b/p"}}}}, schemas)


def one(objects: Objects, kind: str) -> dict[str, Any]:
    (found,) = [body for body in objects if body["kind"] == kind]
    return found


def container_of(objects: Objects) -> dict[str, Any]:
    if any(body["kind"] == "Deployment" for body in objects):
        return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return one(objects, "ServingRuntime")["spec"]["containers"][0]


def pod_volumes(objects: Objects) -> dict[str, dict[str, Any]]:
    if any(body["kind"] == "Deployment" for body in objects):
        volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    else:
        volumes = one(objects, "ServingRuntime")["spec"]["volumes"]
    return {volume["name"]: volume for volume in volumes}


def subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return small.items() <= big.items()


@pytest.fixture(scope="module")
def rendered(deployed: Callable[..., Path], kubectl: str) -> dict[str, Objects]:
    """The S3-endpoint deployment, each kustomization rendered."""
    output = deployed(URIS["s3-endpoint"], "--replicas", "2", "--max-replicas", "6")
    return {overlay: render(kubectl, output / overlay) for overlay in COUNTS}


@pytest.mark.parametrize("uri", URIS.values(), ids=URIS.keys())
def test_every_kustomization_renders_and_validates(
    uri: str, deployed: Callable[..., Path], kubectl: str, schemas: Path
) -> None:
    output = deployed(uri)
    checked: dict[str, set[str]] = {}
    for overlay, count in COUNTS.items():
        objects = render(kubectl, output / overlay)
        assert len(objects) == count, [body["kind"] for body in objects]
        for body in objects:
            checked.setdefault(validate(body, schemas), set()).add(body["kind"])
    adapter = yaml.safe_load((output / "prometheus-adapter-rules.yaml").read_text())
    checked.setdefault(validate(adapter, schemas), set()).add(adapter["kind"])
    assert set().union(*checked.values()) == CORE_KINDS | {
        "ServiceMonitor",
        "ServingRuntime",
        "InferenceService",
        "PodMonitor",
    }
    print(f"{uri}: validated {sorted((k, sorted(v)) for k, v in checked.items())}")


def test_probes_point_at_the_health_endpoints_on_served_ports(rendered: dict[str, Objects]) -> None:
    for overlay in COUNTS:
        container = container_of(rendered[overlay])
        ports = {port["containerPort"] for port in container["ports"]}
        args = dict(zip(container["args"][::2], container["args"][1::2]))  # flag, value pairs
        http, health = int(args["--http-port"]), int(args["--health-port"])
        assert {http, health} <= ports and health != http  # serve's probes, not Triton's readiness (daemon.py)
        for name, path in [("startupProbe", "/v2/health/live"), ("livenessProbe", "/v2/health/live")]:
            assert container[name]["httpGet"] == {"path": path, "port": health}, (overlay, name)
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": health}
        startup = container["startupProbe"]  # serve gives up loading when the kubelet would
        assert float(args["--start-timeout"]) == startup["periodSeconds"] * startup["failureThreshold"]
    kserve = container_of(rendered["overlays/kserve"])
    assert "--http-port" in kserve["args"] and kserve["args"][kserve["args"].index("--http-port") + 1] == "8080"
    assert kserve["args"][kserve["args"].index("--grpc-port") + 1] == "9000"  # KServe's grpc-v2 port


def test_service_and_monitor_reach_the_named_ports(rendered: dict[str, Objects]) -> None:
    objects = rendered[""]
    named = {port["name"]: port["containerPort"] for port in container_of(objects)["ports"]}
    assert named.pop("health") == 8003  # the kubelet's, from the node: not in the Service
    assert named == {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 9000}
    args = container_of(objects)["args"]
    assert args[args.index("--openai-port") + 1] == "9000"
    service = one(objects, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        name: (port, name) for name, port in named.items()
    }
    monitor = one(objects, "ServiceMonitor")
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [
        ("metrics", "/metrics"),
        ("openai", "/metrics"),  # the OpenAI API's own metrics
    ]


def test_labels_and_selectors_match(rendered: dict[str, Objects]) -> None:
    for overlay in ("", "overlays/gpu"):
        objects = rendered[overlay]
        deployment = one(objects, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert subset(deployment["spec"]["selector"]["matchLabels"], pod_labels)
        assert subset(one(objects, "Service")["spec"]["selector"], pod_labels)
        assert subset(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"]
        assert subset(spread["matchLabels"], pod_labels)
        service_labels = one(objects, "Service")["metadata"]["labels"]
        assert subset(one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"], service_labels)
        target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        assert account == one(objects, "ServiceAccount")["metadata"]["name"]
    kserve = rendered["overlays/kserve"]
    predictor = one(kserve, "InferenceService")["spec"]["predictor"]
    assert predictor["model"]["runtime"] == one(kserve, "ServingRuntime")["metadata"]["name"]
    assert predictor["serviceAccountName"] == one(kserve, "ServiceAccount")["metadata"]["name"]


def test_shm_is_a_memory_volume_sized_for_the_model_processes(rendered: dict[str, Objects], repository: Path) -> None:
    processes = read_facts(storage.Files(repository)).processes
    for overlay in COUNTS:
        container = container_of(rendered[overlay])
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        shm = pod_volumes(rendered[overlay])[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        size = quantity_bytes(shm["sizeLimit"])
        assert size >= processes * 64 * 2**20, "64 MiB per model process at least"
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, "Guaranteed QoS"
        assert quantity_bytes(limits["memory"]) > size + processes * 400 * 2**20, "shm counts against the limit"


def quantity_bytes(value: str) -> int:
    assert value.endswith("Mi"), value
    return int(value[:-2]) * 2**20


def test_pods_run_non_root_read_only_with_no_capabilities(rendered: dict[str, Objects]) -> None:
    for overlay in COUNTS:
        container = container_of(rendered[overlay])
        security = container["securityContext"]
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
        assert not security["allowPrivilegeEscalation"]
        writable = {mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")}
        assert writable == {"/dev/shm", "/tmp"}, "the only writable paths: the Python backend's and the server's"
        assert {"name": "HOME", "value": "/tmp"} in container["env"]
    pod = one(rendered[""], "Deployment")["spec"]["template"]["spec"]
    user = pod["securityContext"]["runAsUser"]
    assert pod["securityContext"]["runAsNonRoot"] and user != 0
    assert f"USER {user}:{user}" in (ROOT / "Dockerfile").read_text(), "the image runs as the pods do"
    assert pod["automountServiceAccountToken"] is False


def test_termination_grace_covers_the_drain(rendered: dict[str, Objects]) -> None:
    for overlay in ("", "overlays/kserve"):
        objects = rendered[overlay]
        container = container_of(objects)
        grace = int(container["args"][container["args"].index("--grace") + 1])
        assert container["lifecycle"]["preStop"]["sleep"]["seconds"] == PRESTOP_S
        if overlay:
            spec = one(objects, "InferenceService")["spec"]["predictor"]
        else:
            spec = one(objects, "Deployment")["spec"]["template"]["spec"]
        # serve stops everything within grace + UNLOAD_S of SIGTERM (daemon.py): the kubelet's SIGKILL comes later
        assert spec["terminationGracePeriodSeconds"] > PRESTOP_S + grace + UNLOAD_S, "pre-stop, drain, then unload"


def test_the_entry_point_is_the_supervisor(rendered: dict[str, Objects]) -> None:
    """`tritonhf serve` (the supervisor heals crashed models in the pod), with arguments it accepts; the
    Dockerfile's CMD is the same command."""
    for overlay in COUNTS:
        container = container_of(rendered[overlay])
        assert container["command"] == ["tritonhf", "serve"]
        args = cli.parser().parse_args(["serve", *container["args"]])
        assert args.host == "0.0.0.0"
    cmd = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD"))
    assert json.loads(cmd.removeprefix("CMD").strip())[:2] == ["tritonhf", "serve"]


def test_the_hpa_metric_is_the_one_the_adapter_rule_makes(
    rendered: dict[str, Objects], deployed: Callable[..., Path], server: TritonServer
) -> None:
    """The HPA scales on the rule's per-pod series, and the rule reads metrics a real tritonserver exports."""
    hpa = one(rendered[""], "HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == DeployOptions().metric
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert "replicas" not in one(rendered[""], "Deployment")["spec"], "the HPA owns the count"
    adapter = yaml.safe_load((deployed(URIS["gs"]) / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == DeployOptions().metric
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        exported = {line.split()[2] for line in response.read().decode().splitlines() if line.startswith("# TYPE")}
    used = {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert used <= exported
    for name in used:
        assert name in rule["metricsQuery"]
    kserve_query = one(rendered["overlays/kserve"], "InferenceService")["spec"]["predictor"]["autoScaling"]
    query = kserve_query["metrics"][0]["external"]["metric"]["query"]
    assert all(name in query for name in used) and "<<" not in query


@pytest.mark.parametrize("uri", URIS.values(), ids=URIS.keys())
def test_credentials_come_from_a_secret_never_inline(
    uri: str, deployed: Callable[..., Path], kubectl: str, request: pytest.FixtureRequest
) -> None:
    output = deployed(uri)
    location = storage.parse(uri)
    exact = f"/{sealed_id(request.getfixturevalue('repository'))}" if location.scheme == "s3" else ""  # --built's
    for overlay in ("", "overlays/kserve"):
        objects = render(kubectl, output / overlay)
        assert not any(body["kind"] == "Secret" for body in objects)
        container = container_of(objects)
        env = {item["name"]: item for item in container["env"]}
        for name in SECRET_NAMES & env.keys():
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "tritonhf-storage"
        args = container["args"]
        repository = args[args.index("--model-repository") + 1]
        if overlay == "overlays/kserve":
            predictor = one(objects, "InferenceService")["spec"]["predictor"]["model"]
            assert repository == ("/mnt/models" if not location.local else "/models")
            assert (
                predictor.get("storageUri")
                == {
                    "s3-endpoint": f"s3://models/prod/repo{exact}",
                    "s3-aws": f"s3://my-models/prod/repo{exact}",
                    "gs": "gs://my-models/prod/repo",
                    "as": "https://account.blob.core.windows.net/container/prod/repo",
                    "pvc": "pvc://models-claim/prod/repo",
                    "image": None,
                }[next(k for k, v in URIS.items() if v == uri)]
            )
            continue
        volumes = pod_volumes(objects)
        writable = {mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")}
        assert writable == {"/dev/shm", "/tmp"}, "the repository and the credentials are mounted read-only"
        if location.scheme == "s3":
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys() and repository == uri + exact
        elif location.scheme == "as":
            assert {"AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY"} <= env.keys() and repository == uri
        elif location.scheme == "gs":
            path = env["GOOGLE_APPLICATION_CREDENTIALS"]["value"]
            mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            assert volumes[mount["name"]]["secret"]["secretName"] == "tritonhf-storage" and mount["readOnly"]
        elif location.scheme == "pvc":
            assert repository == "/mnt/models/prod/repo"
            claim = volumes["models"]["persistentVolumeClaim"]
            assert claim == {"claimName": "models-claim", "readOnly": True}
        else:
            assert repository == "/models" and not SECRET_NAMES & env.keys()


def test_no_secret_for_workload_identity(deployed: Callable[..., Path], kubectl: str) -> None:
    objects = render(kubectl, deployed(URIS["s3-aws"], "--credentials-secret", ""))
    assert "secretKeyRef" not in json.dumps(objects)


def test_the_gpu_overlay_asks_for_a_gpu(rendered: dict[str, Objects]) -> None:
    pod = one(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"] == GPU_TOLERATIONS
    assert resources["limits"] == resources["requests"]
    base = container_of(rendered[""])["resources"]
    assert "nvidia.com/gpu" not in base["limits"], "the CPU repository's base asks for no GPU"
    assert resources["limits"]["memory"] == base["limits"]["memory"], "the same models in host memory"


def test_kserve_runtime_speaks_v2_on_its_ports(rendered: dict[str, Objects]) -> None:
    runtime = one(rendered["overlays/kserve"], "ServingRuntime")["spec"]
    assert runtime["protocolVersions"] == ["v2", "grpc-v2"]
    assert runtime["annotations"]["prometheus.kserve.io/port"] == "8002"
    assert [f["name"] for f in runtime["supportedModelFormats"]] == ["triton"]
    service = one(rendered["overlays/kserve"], "InferenceService")
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    account = one(rendered["overlays/kserve"], "ServiceAccount")
    assert account["secrets"] == [{"name": "tritonhf-storage"}], "the storage initializer's credentials"
    container = runtime["containers"][0]
    assert container["ports"][0]["containerPort"] == 8080, "the predictor's port comes first"
    monitor = one(rendered["overlays/kserve"], "PodMonitor")["spec"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert {"name": endpoint["port"], "containerPort": 8002, "protocol": "TCP"} in container["ports"]
    assert monitor["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": service["metadata"]["name"]}
    storage_bytes = quantity_bytes(container["resources"]["limits"]["ephemeral-storage"])
    repository_bytes = quantity_bytes(container_of(rendered[""])["resources"]["limits"]["ephemeral-storage"]) / 2.2
    assert storage_bytes > repository_bytes, "the storage initializer's copy counts against the pod's disk"


def served_pod(objects: Objects) -> tuple[dict[str, str], dict[str, Any]]:
    """The labels the server's pods carry (KServe's, for an InferenceService's), and their pod spec's own fields."""
    if any(body["kind"] == "Deployment" for body in objects):
        template = one(objects, "Deployment")["spec"]["template"]
        return template["metadata"]["labels"], template["spec"]
    predictor = one(objects, "InferenceService")
    return {"serving.kserve.io/inferenceservice": predictor["metadata"]["name"]}, predictor["spec"]["predictor"]


def test_the_network_policy_admits_clients_to_the_served_ports_and_monitoring_to_metrics(
    rendered: dict[str, Objects],
) -> None:
    """By default pods of the same namespace reach HTTP, gRPC and the OpenAI API, the monitoring namespace the
    metrics (Triton's, and the OpenAI API's own), on the ports `tritonhf serve` listens on (named ports resolved
    through the container's); the probes' port gets no rule, since the kubelet probes from the node, which a
    policy never blocks."""
    for overlay in COUNTS:
        objects = rendered[overlay]
        labels, pod = served_pod(objects)
        policy = one(objects, "NetworkPolicy")["spec"]
        assert subset(policy["podSelector"]["matchLabels"], labels) and policy["policyTypes"] == ["Ingress"]
        container = container_of(objects)
        named = {port["name"]: port["containerPort"] for port in container["ports"]}
        serve = cli.parser().parse_args(["serve", *container["args"]])
        grpc = serve.grpc_port or serve.http_port + 1
        metrics = serve.metrics_port or serve.http_port + 2
        admitted: dict[int, list] = {}
        for rule in policy["ingress"]:
            for port in rule["ports"]:
                assert port["protocol"] == "TCP" and (isinstance(port["port"], int) or port["port"] in named)
                admitted.setdefault(named.get(port["port"], port["port"]), []).extend(rule["from"])
        clients = [{"podSelector": {}}]
        monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        expected = {serve.http_port: clients, grpc: clients, metrics: monitoring}
        if serve.openai_port:  # the OpenAI API: its clients, and its own /metrics for the monitoring namespace
            expected[serve.openai_port] = clients + monitoring
        assert admitted == expected, overlay
        assert bool(serve.openai_port) == (overlay != "overlays/kserve"), "KServe's runtime has no OpenAI port"
        assert pod["shareProcessNamespace"] is False, "the server's command line (its key) stays in its container"


def test_allow_from_selects_the_clients(deployed: Callable[..., Path], kubectl: str, schemas: Path) -> None:
    """Each --allow-from is one peer, its terms all required; a term outside the grammar is refused."""
    allow = ["namespace:ingress-nginx", "namespace:team=ml,pod:app.kubernetes.io/name=gateway", "pod:role=client"]
    output = deployed(URIS["image"], *(f"--allow-from={peer}" for peer in allow), "--monitoring-namespace", "prom")
    for overlay in ("", "overlays/kserve"):
        policy = one(render(kubectl, output / overlay), "NetworkPolicy")
        validate(policy, schemas)
        clients, scrapers = (rule["from"] for rule in policy["spec"]["ingress"])
        assert clients == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
            {
                "namespaceSelector": {"matchLabels": {"team": "ml"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}},
            },
            {"podSelector": {"matchLabels": {"role": "client"}}},
        ]
        assert scrapers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prom"}}}]
    for bad in ("ingress-nginx", "pod:app", "pods:app=x", "namespace:", "namespace:team=ml,", "pod:app=a b"):
        with pytest.raises(TritonHFError, match="--allow-from"):
            peer(bad)


def test_sizing_follows_the_models() -> None:
    """More model processes: more memory, more /dev/shm, a longer startup budget; CPUs = the instances the build
    chose; an unknown hub model's weights are assumed, and said."""

    def facts(instances: int, weights: int | None) -> Facts:
        models = (Model("a", "python", "KIND_CPU", instances, weights), Model("e", "ensemble", "KIND_CPU", 1, 0))
        return Facts(models, weights or 0, ("a",))

    small, large = facts(1, 2**28), facts(8, 2**28)
    assert large.memory() > small.memory() and large.shm() > small.shm()
    assert (small.cpus("cpu"), large.cpus("cpu")) == (1, 8)
    assert facts(1, None).unknown == ["a"] and facts(1, None).memory() > small.memory()
    gpu = Facts((Model("a", "python", "KIND_GPU", 1, 2**28),), 2**28, ("a",))
    assert gpu.device == "gpu" and gpu.cpus("gpu") >= 2


def test_the_startup_budget_grows_with_the_repository() -> None:
    """A repository that takes longer to load gets more startup probes; a tiny one still gets two minutes."""

    def startup(models: int, size: int) -> int:
        """``models`` one-instance models of ``size`` bytes each: one CPU, their processes start in turn."""
        facts = Facts(tuple(Model(f"m{i}", "python", "KIND_CPU", 1, size) for i in range(models)), models * size, ())
        probe = Pod(facts, DeployOptions(), "cpu", in_tmp=0.0).probes()["startupProbe"]
        return probe["periodSeconds"] * probe["failureThreshold"]

    assert startup(1, 2**20) == 120
    assert startup(1, 2**20) < startup(1, 20 * 2**30) and startup(1, 2**20) < startup(16, 2**20)


def test_the_repositorys_facts(repository: Path) -> None:
    facts = read_facts(storage.Files(repository))
    configs = list(repository.glob("*/config.pbtxt"))
    assert len(facts.models) == len(configs)
    assert all(m.weight_bytes for m in facts.models if m.backend == "python" and m.name.endswith("_model"))
    assert DeployOptions().secret == "tritonhf-storage"


def test_sizes_read_from_s3_equal_those_read_from_the_local_copy(
    repository: Path, s3: Any, tmp_path: Path, deployed: Callable[..., Path]
) -> None:
    """Deploying straight from the pushed repository (no --built) reads it from S3, and sizes the pods the same."""
    uri = s3.uri("deploy/repo")
    storage.push(repository, uri)
    assert read_facts(storage.Files(uri)) == read_facts(storage.Files(repository))
    output = tmp_path / "k8s"
    assert cli.main(["deploy", "kubernetes", "--model-repository", uri, "--output", str(output)]) == 0
    local = deployed(uri)
    for name in ("base/deployment.yaml", "overlays/kserve/servingruntime.yaml"):
        assert (output / name).read_text() == (local / name).read_text()


@pytest.fixture(scope="module")
def ensemble_server(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A classifier exported as a three-step ensemble (tokenize -> network -> postprocess), served."""
    options = BuildOptions(
        output=tmp_path_factory.mktemp("ensemble") / "repo",
        variants=("onnx",),
        runtime="python-ensemble",
        instances=1,
        dtype="float32",
    )
    with TritonServer(build(plan([], [str(tiny[CLASSIFIER])], [], GEN_MAX_LEN), options)) as running:
        yield running


def test_the_queue_rule_counts_each_client_request_once(ensemble_server: TritonServer) -> None:
    """On a real server's counters: the rule's denominator (requests of the served models) grows by the client's
    requests, while the same counter over every model grows by each step's too."""
    facts = read_facts(storage.Files(ensemble_server.repository))
    assert len(facts.models) == 4 and len(facts.served) == 1, facts
    query = queue_time_query("", facts.served)
    pattern = re.search(r'nv_inference_request_success\{model=~"((?:[^"\\]|\\.)*)"\}', query)[1]
    served = re.compile(pattern.replace("\\\\", "\\"))  # the PromQL string literal's escapes undone

    def requests() -> dict[str, float]:
        return {m.name: metric(ensemble_server, "nv_inference_request_success", m.name) for m in facts.models}

    before = requests()
    for prompt in PROMPTS[:6]:
        alone(ensemble_server, facts.served[0], [prompt])
    # the counters move just after the answers (helpers.settled_counters): wait for every step's, then compare
    until(lambda: sum(requests().values()) - sum(before.values()) >= 6 * 4, timeout=10, what="the counters")
    grown = {name: count - before[name] for name, count in requests().items()}
    assert sum(count for name, count in grown.items() if served.fullmatch(name)) == 6
    assert sum(grown.values()) == 6 * 4, "the ensemble and each of its three steps count every request"
