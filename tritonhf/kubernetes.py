"""``tritonhf deploy kubernetes``: manifests for a built repository, sized from it, as a kustomize base and overlays.

What is written (``DIR`` = ``--output``)::

    DIR/kustomization.yaml            the base: plain Kubernetes (kubectl apply -k DIR)
    DIR/base/kustomization.yaml       the same base, where the overlays find it, with one file per object:
        serviceaccount.yaml, deployment.yaml, service.yaml, poddisruptionbudget.yaml,
        horizontalpodautoscaler.yaml, servicemonitor.yaml, networkpolicy.yaml
    DIR/prometheus-adapter-rules.yaml not in the base: the rule that makes the HPA's metric,
                                      for the Prometheus adapter's own configuration
    DIR/overlays/gpu/                 the base on GPU nodes (nvidia.com/gpu, the GPU taint)
    DIR/overlays/kserve/              KServe instead: ServingRuntime + InferenceService

It follows NVIDIA's Kubernetes deployment of Triton (server/deploy/: probes on
the health endpoints, an HPA on queue time through the Prometheus adapter, a
ServiceMonitor) and KServe's Triton runtime (protocols v2 and grpc-v2, HTTP
8080 and gRPC 9000, the repository at /mnt/models), plus what their users keep
asking for: /dev/shm as a memory-backed emptyDir sized for the Python backend,
non-root with every capability dropped and a read-only root filesystem, and a
termination grace that covers the server's drain.

Everything is derived from the repository (``Facts``): the memory from the
weights and the model processes, CPUs from the instance counts the build chose,
the startup probe's budget from an estimate of the load time. The entry point is
``tritonhf serve``, so the supervisor heals a crashed model inside the pod.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tritonhf import TritonHFError, storage
from tritonhf.placement import node_affinity
from tritonhf.repository import sealed_id, staged
from tritonhf.server import EXIT_MARGIN_S, LIVE, READY, UNLOAD_S
from tritonhf.sizing import FRONTEND_BASE, Facts, MiB, read_facts

Object = dict[str, Any]

# Ports: tritonhf serve's (Triton's defaults) and, under KServe, the ones its Triton runtime uses.
HTTP, GRPC, METRICS = 8000, 8001, 8002
OPENAI = 9000  # serve --openai-port: the OpenAI-compatible API, and its own /metrics
KSERVE_HTTP, KSERVE_GRPC = 8080, 9000
IN_IMAGE = "/models"  # where the Dockerfile builds the repository
MOUNT = "/mnt/models"  # where a PVC is mounted, and where KServe's storage initializer puts storageUri
USER = 1000  # the NGC image's triton-server user
HEALTH = 8003  # tritonhf serve's probes (daemon.py): Triton's own readiness skips a model unloaded to be healed
PRESTOP_S = 5  # endpoints are removed while the pod still serves; then SIGTERM starts the drain
SECRET_DIR = "/var/run/secrets/tritonhf-storage"

CREDENTIALS = {  # the environment each object store's client reads (Triton's and boto3's)
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    "as": ("AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY"),
}
OPTIONAL_CREDENTIALS = {"s3": ("AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN")}
GCS_KEY = "gcloud-application-credentials.json"  # the key KServe's storage initializer reads too
CONTAINER = "tritonhf"  # the Deployment's container; the gpu overlay's patch names it


@dataclass(frozen=True)
class DeployOptions:
    model_repository: str = IN_IMAGE
    name: str = "tritonhf"
    namespace: str | None = None
    image: str = "tritonhf:latest"
    replicas: int = 2
    max_replicas: int = 8
    device: str | None = None  # None: the repository's instance kind
    credentials_secret: str | None = None  # None: <name>-storage; "": none (workload identity)
    grace_s: int = 25
    queue_target_us: int = 50_000
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    allow_from: tuple[str, ...] = ()  # who may reach the inference ports, each a peer(); none: this namespace's pods
    monitoring_namespace: str = "monitoring"  # who may scrape the metrics port (kube-prometheus-stack's default)
    openai: bool = True  # the OpenAI-compatible API beside the server, on OPENAI

    @property
    def metric(self) -> str:
        """The HPA's per-pod metric: one per deployment, as its adapter rule knows this repository's models."""
        return f"{self.name.replace('-', '_').replace('.', '_')}_queue_duration_us_per_request"

    @property
    def secret(self) -> str:
        return f"{self.name}-storage" if self.credentials_secret is None else self.credentials_secret


def quantity(size: int) -> str:
    """Bytes as a Kubernetes quantity, rounded up to whole MiB."""
    return f"{math.ceil(size / MiB)}Mi"


@dataclass
class Pod:
    """The parts of the server's pod that the Deployment and the KServe runtime share."""

    facts: Facts
    options: DeployOptions
    device: str
    in_tmp: float  # copies of the repository in /tmp, of object storage (see scratch)
    elsewhere: float = 0.0  # copies on other disk volumes of the pod (KServe's storage initializer's)
    http: int = HTTP
    volumes: list[Object] = field(default_factory=list)
    mounts: list[Object] = field(default_factory=list)
    env: list[Object] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env += [
            {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ]
        self.volume("dshm", "/dev/shm", {"emptyDir": {"medium": "Memory", "sizeLimit": quantity(self.facts.shm())}})
        self.volume("tmp", "/tmp", {"emptyDir": {"sizeLimit": quantity(self.scratch())}})

    def volume(self, name: str, path: str, source: Object, read_only: bool = False) -> None:
        self.volumes.append({"name": name, **source})
        self.mounts.append({"name": name, "mountPath": path, **({"readOnly": True} if read_only else {})})

    def scratch(self) -> int:
        """/tmp: ``in_tmp`` copies of the repository, and 1 GiB (server_pod). From s3:// that is one: ``tritonhf
        serve`` downloads the exact build to /tmp/tritonhf-builds/<build id>/ and Triton serves that directory,
        copying nothing; the emptyDir outlives a restart of the container, which reuses the verified copy, and a
        download cut short is removed before the next starts. From gs:// and as:// it is 2.2: Triton copies each
        model itself and removes the copy when it unloads the model, but a server killed outright leaves it
        behind; a second leftover overflows the limit, and the pod is evicted and replaced with a clean one."""
        return int(self.facts.total_bytes * self.in_tmp) + 1024 * MiB

    def resources(self) -> Object:
        """Requests = limits (Guaranteed QoS: evicted last). The CPU limit is deliberate: the models size their
        thread pools from the cgroup's CPU quota (hardware.cpu_count). /dev/shm counts against the memory limit."""
        memory = quantity(self.facts.memory() + self.facts.shm() + (FRONTEND_BASE if self.options.openai else 0))
        amounts = {
            "cpu": str(self.facts.cpus(self.device)),
            "memory": memory,
            "ephemeral-storage": quantity(self.scratch() + int(self.facts.total_bytes * self.elsewhere)),
        }
        if self.device == "gpu":
            amounts["nvidia.com/gpu"] = "1"
        return {"requests": dict(amounts), "limits": dict(amounts)}

    @property
    def start_budget_s(self) -> int:
        """How long the models may take to load: the startup probe's budget and ``serve --start-timeout`` both."""
        return math.ceil(max(120, 60 + 2 * self.facts.load_estimate_s(self.device)) / 10) * 10

    def probes(self) -> Object:
        """On tritonhf serve's probes (daemon.py), which open once the models loaded: startup gates liveness
        meanwhile; readiness is false while any model is down (healing, backing off, given up) or the pod
        drains; liveness is false once a model was given up (serve then exits too)."""
        return {
            "startupProbe": probe(LIVE, HEALTH, period=10, failures=self.start_budget_s // 10),
            "livenessProbe": probe(LIVE, HEALTH, period=10, failures=3, timeout=5),
            "readinessProbe": probe(READY, HEALTH, period=5, failures=2, timeout=3),
        }

    def container(self, name: str, repository: str, ports: list[Object], extra_args: Iterable[str] = ()) -> Object:
        return {
            "name": name,
            "image": self.options.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["tritonhf", "serve"],  # the supervisor: heals a crashed model, drains on SIGTERM
            "args": [
                "--model-repository",
                repository,
                "--host",
                "0.0.0.0",
                "--http-port",
                str(self.http),
                "--health-port",
                str(HEALTH),
                *extra_args,
                "--grace",
                str(self.options.grace_s),
                "--start-timeout",
                str(self.start_budget_s),
            ],
            "env": self.env,
            "ports": [*ports, {"name": "health", "containerPort": HEALTH, "protocol": "TCP"}],
            "resources": self.resources(),
            **self.probes(),
            "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S}}},
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": self.mounts,
        }

    def security(self) -> Object:
        return {
            "runAsNonRoot": True,
            "runAsUser": USER,
            "runAsGroup": USER,
            "fsGroup": USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        }

    @property
    def termination_grace_s(self) -> int:
        """The kubelet's SIGKILL comes after serve's own budget (its drain, the unload) and a margin."""
        return PRESTOP_S + self.options.grace_s + UNLOAD_S + EXIT_MARGIN_S


def probe(path: str, port: int, *, period: int, failures: int, timeout: int = 3) -> Object:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def credentials(pod: Pod, location: storage.Location, secret: str) -> None:
    """The object store's credentials, from a Secret: never a value in the manifests."""
    if not secret:
        return
    if location.scheme == "gs":
        pod.volume("storage-credentials", SECRET_DIR, {"secret": {"secretName": secret}}, read_only=True)
        pod.env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{SECRET_DIR}/{GCS_KEY}"})
        return
    for key in CREDENTIALS.get(location.scheme, ()):
        pod.env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    for key in OPTIONAL_CREDENTIALS.get(location.scheme, ()):
        pod.env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}})


def metadata(options: DeployOptions, name: str | None = None, **extra: Any) -> Object:
    return {"name": name or options.name, "labels": labels(options), **extra}


def labels(options: DeployOptions) -> dict[str, str]:
    return {
        **selector(options),
        "app.kubernetes.io/component": "inference-server",
        "app.kubernetes.io/part-of": "tritonhf",
    }


def selector(options: DeployOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tritonhf", "app.kubernetes.io/instance": options.name}


def named_ports(http: int, grpc: int, metrics: int) -> list[Object]:
    return [
        {"name": "http", "containerPort": http, "protocol": "TCP"},
        {"name": "grpc", "containerPort": grpc, "protocol": "TCP"},
        {"name": "metrics", "containerPort": metrics, "protocol": "TCP"},
    ]


def expect_build(location: storage.Location) -> tuple[str, ...]:
    """serve's ``--build``, where the pod serves a copy somebody else made of an exact build (KServe's storage
    initializer, a PVC): its seal must be there and be this build's. (Serving s3:// itself, serve downloads the
    build the URI names and checks it.)"""
    return ("--build", location.build) if location.build else ()


def server_pod(facts: Facts, options: DeployOptions, device: str) -> tuple[Pod, str]:
    """The Deployment's pod, wired to the repository: (the pod, where the server reads the repository)."""
    location = storage.parse(options.model_repository)
    pod = Pod(facts, options, device, in_tmp=1.0 if location.scheme == "s3" else 2.2 if location.remote else 0.0)
    repository = options.model_repository
    if location.scheme == "pvc":
        claim = {"persistentVolumeClaim": {"claimName": location.container, "readOnly": True}}
        pod.volume("models", MOUNT, claim, read_only=True)
        repository = str(PurePosixPath(MOUNT, location.prefix))
    credentials(pod, location, options.secret)
    return pod, repository


def base(facts: Facts, options: DeployOptions, device: str) -> dict[str, Object]:
    """The plain-Kubernetes objects, by file name."""
    pod, repository = server_pod(facts, options, device)
    copied = expect_build(storage.parse(options.model_repository)) if repository.startswith(MOUNT) else ()
    ports, args = named_ports(HTTP, GRPC, METRICS), list(copied)
    if options.openai:  # the API's own readiness is part of serve's probe (daemon.Probes)
        ports.append({"name": "openai", "containerPort": OPENAI, "protocol": "TCP"})
        args += ["--openai-port", str(OPENAI)]
    container = pod.container(CONTAINER, repository, ports, args)
    template: Object = {
        "metadata": {"labels": labels(options), "annotations": {"kubectl.kubernetes.io/default-container": CONTAINER}},
        "spec": {
            "serviceAccountName": options.name,
            "automountServiceAccountToken": False,
            "shareProcessNamespace": False,  # no other container may read the server's command line: its key
            "securityContext": pod.security(),
            "terminationGracePeriodSeconds": pod.termination_grace_s,
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": selector(options)},
                }
            ],
            "containers": [container],
            "volumes": pod.volumes,
        },
    }
    if device == "gpu":
        template["spec"]["tolerations"] = GPU_TOLERATIONS
    if affinity := node_affinity(facts.host):  # nodes whose CPU has what the build's choices need
        template["spec"]["affinity"] = affinity
    return {
        "serviceaccount.yaml": {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(options),  # annotate it for IRSA / Workload Identity instead of a Secret
            "automountServiceAccountToken": False,
        },
        "deployment.yaml": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(options),
            "spec": {
                # no replicas: the HPA owns the count (from minReplicas), and an apply would reset it
                "revisionHistoryLimit": 3,
                "selector": {"matchLabels": selector(options)},
                # a new pod serves before an old one goes: capacity never drops during a rollout
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": template,
            },
        },
        "service.yaml": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(options),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(options),
                "ports": [
                    {"name": "http", "port": HTTP, "targetPort": "http", "protocol": "TCP"},
                    {
                        "name": "grpc",
                        "port": GRPC,
                        "targetPort": "grpc",
                        "protocol": "TCP",
                        "appProtocol": "kubernetes.io/h2c",
                    },
                    {"name": "metrics", "port": METRICS, "targetPort": "metrics", "protocol": "TCP"},
                    *([{"name": "openai", "port": OPENAI, "targetPort": "openai", "protocol": "TCP"}] * options.openai),
                ],
            },
        },
        "poddisruptionbudget.yaml": {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": metadata(options),
            "spec": {
                "maxUnavailable": 1,  # never minAvailable = replicas: that would block every node drain
                "selector": {"matchLabels": selector(options)},
                "unhealthyPodEvictionPolicy": "AlwaysAllow",  # a crash-looping pod must not block a drain
            },
        },
        "horizontalpodautoscaler.yaml": {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(options),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": options.name},
                "minReplicas": options.replicas,
                "maxReplicas": options.max_replicas,
                "metrics": [
                    {
                        "type": "Pods",
                        "pods": {
                            "metric": {"name": options.metric},
                            "target": {"type": "AverageValue", "averageValue": str(options.queue_target_us)},
                        },
                    }
                ],
                "behavior": {
                    # a pod takes its load time to serve: add pods at once, remove them slowly
                    "scaleUp": {
                        "stabilizationWindowSeconds": 0,
                        "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
                    },
                    "scaleDown": {
                        "stabilizationWindowSeconds": 300,
                        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                    },
                },
            },
        },
        "servicemonitor.yaml": {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": metadata(options),
            "spec": {
                "selector": {"matchLabels": selector(options)},
                "endpoints": [
                    {"port": port, "path": "/metrics", "interval": "15s"}
                    for port in ("metrics", "openai")[: 1 + options.openai]
                ],
            },
        },
        "networkpolicy.yaml": network_policy(
            options, selector(options), ["http", "grpc", "openai"][: 2 + options.openai], ["openai"] * options.openai
        ),
    }


GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # every namespace carries its name under it (Kubernetes >= 1.22)
LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def peer(text: str) -> Object:
    """One ``--allow-from``: its terms as a NetworkPolicy peer, which a client must match in full.

    ``namespace:NAME`` or ``namespace:KEY=VALUE`` select namespaces, ``pod:KEY=VALUE`` pods (of the policy's
    own namespace, unless a namespace term is there too); several terms of a kind must all hold."""
    selectors: dict[str, dict[str, str]] = {}
    for term in text.split(","):
        kind, _, labels = term.partition(":")
        key, equals, value = labels.partition("=")
        if kind == "namespace" and not equals:
            key, value = NAMESPACE_LABEL, labels
        valid = kind in ("namespace", "pod") and LABEL_KEY.fullmatch(key) and LABEL_VALUE.fullmatch(value)
        if not valid or not (equals or value):  # pod:KEY alone, or namespace: with no name
            raise TritonHFError(
                f"--allow-from {text!r}: {term!r} is not namespace:NAME, namespace:KEY=VALUE or pod:KEY=VALUE"
            )
        selectors.setdefault(f"{kind}Selector", {})[key] = value
    return {name: {"matchLabels": labels} for name, labels in selectors.items()}


def network_policy(
    options: DeployOptions, pods: dict[str, str], inference: list[str | int], scraped: list[str] | tuple = ()
) -> Object:
    """Ingress to the server's pods: the inference ports from ``--allow-from`` (default: pods of the same
    namespace), the metrics port (and ``scraped``: the OpenAI API's, whose /metrics is its own) from the monitoring
    namespace, nothing else; egress stays open (object storage).

    No rule for the probes' port: the kubelet probes from the pod's node, and Kubernetes always admits traffic
    from a pod's own node, whatever the policies say. Enforced only where the network plugin implements
    NetworkPolicy (Calico, Cilium, ...); elsewhere the object is accepted and does nothing."""
    clients = [peer(text) for text in options.allow_from] or [{"podSelector": {}}]
    monitoring = {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: options.monitoring_namespace}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(options),
        "spec": {
            "podSelector": {"matchLabels": pods},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": clients, "ports": [{"port": port, "protocol": "TCP"} for port in inference]},
                {"from": [monitoring], "ports": [{"port": port, "protocol": "TCP"} for port in ("metrics", *scraped)]},
            ],
        },
    }


def queue_time_query(matchers: str, served: Sequence[str], group: str = "") -> str:
    """Queue time per client request over the last minute, in microseconds: the queue time of every model
    (an ensemble's queueing happens in its steps) over the requests of the served models only (an ensemble's
    steps count each of its requests again). ``group``: a ``by (...)`` clause."""
    names = "|".join(re.sub(r"([.+*?()|\[\]{}^$\\])", r"\\\1", name) for name in served)  # RE2, literally
    names = names.replace("\\", "\\\\")  # inside a PromQL string literal
    requests = f'{matchers},model=~"{names}"' if matchers else f'model=~"{names}"'
    return (
        f"sum(rate(nv_inference_queue_duration_us{{{matchers}}}[1m])){group}"
        f" / clamp_min(sum(rate(nv_inference_request_success{{{requests}}}[1m])){group}, 0.001)"
    )


def adapter_rules(facts: Facts, options: DeployOptions) -> Object:
    """The Prometheus adapter rule behind the HPA's metric: ``queue_time_query`` for each pod."""
    rule = {
        "seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": "^nv_inference_queue_duration_us$", "as": options.metric},
        "metricsQuery": queue_time_query("<<.LabelMatchers>>", facts.served, " by (<<.GroupBy>>)"),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(options, f"{options.name}-prometheus-adapter-rules"),
        "data": {"config.yaml": yaml.safe_dump({"rules": [rule]}, sort_keys=False, width=100_000)},
    }


def gpu_patch(facts: Facts, options: DeployOptions) -> Object:
    """The base's container sized for the GPU (one GPU; CPUs for the Python around it), the GPU taint tolerated."""
    resources = server_pod(facts, options, "gpu")[0].resources()
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": options.name},
        "spec": {
            "template": {
                "spec": {
                    "tolerations": GPU_TOLERATIONS,
                    "containers": [{"name": CONTAINER, "resources": resources}],
                }
            }
        },
    }


def kserve_storage_uri(location: storage.Location) -> str | None:
    """KServe's storage initializer's form of the repository URI; None: the repository is in the image.

    For s3:// it is the exact build (deploy resolved it): the initializer copies that build's files, seal
    included, to /mnt/models, and ``tritonhf serve`` checks them there before Triton loads them."""
    if location.local:
        return None
    if location.scheme == "as":  # KServe names Azure blobs by their HTTPS address
        account, container = location.container.split("/")
        return f"https://{account}.blob.core.windows.net/{container}/{location.prefix}".rstrip("/")
    return f"{location.scheme}://{location.container}/{location.prefix}".rstrip("/")


def kserve(facts: Facts, options: DeployOptions, device: str) -> dict[str, Object]:
    """A namespaced ServingRuntime for this image, and an InferenceService on the repository (RawDeployment, KEDA)."""
    location = storage.parse(options.model_repository)
    pod = Pod(facts, options, device, in_tmp=0.0, elsewhere=1.2, http=KSERVE_HTTP)  # KServe copies it itself
    uri = kserve_storage_uri(location)
    ports = [  # the first is the predictor's; the metrics port is there for the PodMonitor to find
        {"name": "http", "containerPort": KSERVE_HTTP, "protocol": "TCP"},
        {"name": "metrics", "containerPort": METRICS, "protocol": "TCP"},
    ]
    extra = ("--grpc-port", str(KSERVE_GRPC), "--metrics-port", str(METRICS), *expect_build(location))
    container = pod.container("kserve-container", MOUNT if uri else options.model_repository, ports, extra)
    runtime_spec: Object = {
        "annotations": {"prometheus.kserve.io/port": str(METRICS), "prometheus.kserve.io/path": "/metrics"},
        "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
        "protocolVersions": ["v2", "grpc-v2"],
        "containers": [container],
        "volumes": pod.volumes,
    }
    if device == "gpu":
        runtime_spec["tolerations"] = GPU_TOLERATIONS
    if affinity := node_affinity(facts.host):
        runtime_spec["affinity"] = affinity
    predictor_pods = {"serving.kserve.io/inferenceservice": options.name}  # KServe labels its pods so
    pods = f'pod=~"{options.name}-predictor-.*"' + (f',namespace="{options.namespace}"' if options.namespace else "")
    model: Object = {"modelFormat": {"name": "triton", "version": "2"}, "runtime": options.name}
    if uri:
        model["storageUri"] = uri
    service_account: Object = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(options, f"{options.name}-kserve"),
    }
    if options.secret and uri and location.scheme != "pvc":
        # KServe's storage initializer reads the credentials (and, for S3, the endpoint's annotations) from the
        # Secrets of the predictor's service account
        service_account["secrets"] = [{"name": options.secret}]
    return {
        "servingruntime.yaml": {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "ServingRuntime",
            "metadata": metadata(options),
            "spec": runtime_spec,
        },
        "serviceaccount.yaml": service_account,
        "inferenceservice.yaml": {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": metadata(
                options,
                annotations={
                    "serving.kserve.io/deploymentMode": "RawDeployment",
                    "serving.kserve.io/autoscalerClass": "keda",
                },
            ),
            "spec": {
                "predictor": {
                    "serviceAccountName": f"{options.name}-kserve",
                    "minReplicas": options.replicas,
                    "maxReplicas": options.max_replicas,
                    "terminationGracePeriodSeconds": pod.termination_grace_s,
                    "shareProcessNamespace": False,  # as in the base: the server's key stays in its container
                    "securityContext": pod.security(),
                    "autoScaling": {
                        "metrics": [
                            {
                                "type": "External",
                                "external": {
                                    "metric": {
                                        "backend": "prometheus",
                                        "serverAddress": options.prometheus_url,
                                        "query": queue_time_query(pods, facts.served),
                                    },
                                    # the query is already an average over the pods: HPA's Value target
                                    "target": {"type": "Value", "value": str(options.queue_target_us)},
                                },
                            }
                        ]
                    },
                    "model": model,
                },
            },
        },
        "podmonitor.yaml": {  # KServe's Services expose the predictor's port only: scrape the pods
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": metadata(options),
            "spec": {
                "selector": {"matchLabels": predictor_pods},
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
            },
        },
        # RawDeployment: clients reach the pods directly (no Knative activator to admit); gRPC is not a named port
        "networkpolicy.yaml": network_policy(options, predictor_pods, ["http", KSERVE_GRPC]),
    }


def kustomization(resources: Iterable[str], namespace: str | None = None, **extra: Any) -> Object:
    body: Object = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if namespace:
        body["namespace"] = namespace
    return {**body, "resources": list(resources), **extra}


def literal(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    """Multi-line strings (the adapter's rules) as YAML block literals."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


class Dumper(yaml.SafeDumper):
    pass


Dumper.add_representer(str, literal)


def write_yaml(path: Path, body: Object, note: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        HEADER + "".join(f"# {line}\n" for line in note.splitlines()) + yaml.dump(body, Dumper=Dumper, sort_keys=False)
    )


GPU_NOTE = """One GPU per pod, on a node with NVIDIA's device plugin. The models use it only if the repository was
built with --device gpu (KIND_GPU instances); `tritonhf deploy --device gpu` sizes the base for it too."""
ADAPTER_NOTE = """Not part of any kustomization: the Prometheus adapter reads one configuration of its own. Merge these
rules into it (Helm chart prometheus-community/prometheus-adapter: values `rules.custom`); the HPA's
metric is the per-pod series this rule makes."""
HEADER = "# Generated by `tritonhf deploy kubernetes`; change it with kustomize patches, or generate it again.\n"
DEPLOY_MARKER = ".tritonhf-deploy.json"


def deploy(built: storage.Files, options: DeployOptions, output: Path) -> dict[str, int]:
    """Write the base and the overlays to ``output`` (replaced whole); returns object counts per kustomization."""
    facts = read_facts(built)
    device = options.device or facts.device
    if device == "cpu" and facts.device == "gpu":
        raise TritonHFError("the repository's models run on the GPU (KIND_GPU): deploy it with --device gpu")
    objects, serving = base(facts, options, device), kserve(facts, options, device)
    with staged(output.resolve(), DEPLOY_MARKER) as staging:
        for name, body in objects.items():
            write_yaml(staging / "base" / name, body)
        write_yaml(staging / "base" / "kustomization.yaml", kustomization(objects, options.namespace))
        # kustomize refuses an overlay inside its base's directory (a cycle): the base is base/, and DIR's own
        # kustomization is the base too, so that `kubectl apply -k DIR` deploys it
        write_yaml(staging / "kustomization.yaml", kustomization(["base"]))
        write_yaml(staging / "prometheus-adapter-rules.yaml", adapter_rules(facts, options), ADAPTER_NOTE)
        gpu = staging / "overlays" / "gpu"
        write_yaml(gpu / "deployment-gpu.yaml", gpu_patch(facts, options), GPU_NOTE)
        write_yaml(gpu / "kustomization.yaml", kustomization(["../../base"], patches=[{"path": "deployment-gpu.yaml"}]))
        for name, body in serving.items():
            write_yaml(staging / "overlays" / "kserve" / name, body)
        write_yaml(staging / "overlays" / "kserve" / "kustomization.yaml", kustomization(serving, options.namespace))
        summary = {
            "repository": options.model_repository,
            "device": device,
            "models": len(facts.models),
            "model_processes": facts.processes,
            "load_estimate_s": round(facts.load_estimate_s(device), 1),
            "assumed_weights": facts.unknown,
        }
        (staging / DEPLOY_MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return {"base": len(objects), "gpu": len(objects), "kserve": len(serving)}


def next_steps(options: DeployOptions, output: Path, facts: Facts | None = None) -> str:
    """What to run after ``deploy``: the Secret (if any), then apply."""
    location = storage.parse(options.model_repository)
    lines = []
    secret = options.secret
    if secret and location.scheme == "s3":
        lines.append(
            f"kubectl create secret generic {secret} --from-literal=AWS_ACCESS_KEY_ID=... "
            "--from-literal=AWS_SECRET_ACCESS_KEY=... [--from-literal=AWS_DEFAULT_REGION=...]"
        )
        if location.endpoint:
            host = location.endpoint.split("://", 1)[1]
            https = int(location.endpoint.startswith("https"))
            lines.append(
                f"kubectl annotate secret {secret} serving.kserve.io/s3-endpoint={host}"
                f" serving.kserve.io/s3-usehttps={https}   # KServe only"
            )
    elif secret and location.scheme == "gs":
        lines.append(f"kubectl create secret generic {secret} --from-file={GCS_KEY}=service-account.json")
    elif secret and location.scheme == "as":
        lines.append(
            f"kubectl create secret generic {secret} --from-literal=AZURE_STORAGE_ACCOUNT=... "
            "--from-literal=AZURE_STORAGE_KEY=KEY --from-literal=AZURE_STORAGE_ACCESS_KEY=KEY"
            "   # the server reads the first two, KServe's storage initializer the last"
        )
    lines += [
        f"kubectl apply -k {output}                    # Deployment, Service, PDB, HPA, ServiceMonitor, NetworkPolicy",
        f"kubectl apply -k {output}/overlays/gpu       # or: the same on GPU nodes",
        f"kubectl apply -k {output}/overlays/kserve    # or: KServe (ServingRuntime + InferenceService)",
        f"# the HPA's metric {options.metric}: merge {output}/prometheus-adapter-rules.yaml into the adapter's",
    ]
    if not options.allow_from:
        lines.append(
            "# the NetworkPolicy admits inference traffic from this namespace's pods only: add --allow-from"
            " namespace:NAME for an ingress controller or gateway in another namespace"
        )
    affinity = node_affinity(facts.host) if facts is not None else None
    if affinity and "requiredDuringSchedulingIgnoredDuringExecution" in affinity["nodeAffinity"]:
        lines.append(
            "# the pods require CPU features (Node Feature Discovery labels, README 'Where a repository is served'):"
            " without NFD on the cluster they stay Pending"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DeployOptions()
    add = parser.add_argument
    add(
        "--model-repository",
        default=defaults.model_repository,
        help="where the pods read the repository: s3://[host:port/]bucket/prefix, gs://bucket/prefix,"
        " as://account/container/prefix, pvc://claim/subpath, or a path inside the image (default: %(default)s,"
        " where the Dockerfile builds it)",
    )
    add("--output", type=Path, required=True, help="directory for the kustomize base and overlays (replaced)")
    add(
        "--built",
        type=Path,
        default=None,
        help="a local copy of the built repository to size the pods from (default: --model-repository itself,"
        " read from S3 or this machine; needed for gs://, as://, pvc://)",
    )
    add("--name", default=defaults.name, help="objects' name and app.kubernetes.io/instance (default: %(default)s)")
    add("--namespace", default=None, help="kustomize namespace (default: none, kubectl's)")
    add("--image", default=defaults.image, help="the Dockerfile's image, pushed to a registry (default: %(default)s)")
    add("--replicas", type=int, default=defaults.replicas, help="and the HPA's minimum (default: %(default)s)")
    add("--max-replicas", type=int, default=defaults.max_replicas, help="the HPA's maximum (default: %(default)s)")
    add(
        "--device",
        choices=("cpu", "gpu"),
        default=None,
        help="size the base for it; default: the repository's instance kind",
    )
    add(
        "--credentials-secret",
        default=None,
        help="Secret holding the object store's credentials (default: <name>-storage; '' for none:"
        " IRSA / Workload Identity on the service account)",
    )
    add("--grace", type=int, default=defaults.grace_s, help="seconds a stopping pod drains (default: %(default)s)")
    add(
        "--queue-target-ms",
        type=float,
        default=defaults.queue_target_us / 1000,
        help="the autoscaler's target: queue time per request (default: %(default)s)",
    )
    add("--prometheus-url", default=defaults.prometheus_url, help="KServe's KEDA scaler queries it")
    add(
        "--allow-from",
        action="append",
        default=[],
        metavar="PEER",
        help="who the NetworkPolicy lets reach the HTTP, gRPC and OpenAI ports; repeat for more. PEER: comma-separated"
        " terms a client must all match: namespace:NAME, namespace:KEY=VALUE (namespaces by label), pod:KEY=VALUE (pods"
        " by label; of this namespace unless a namespace term is given too). Default: every pod of this namespace",
    )
    add(
        "--monitoring-namespace",
        default=defaults.monitoring_namespace,
        help="the namespace whose pods (Prometheus) may scrape the metrics port (default: %(default)s)",
    )
    add(
        "--no-openai",
        dest="openai",
        action="store_false",
        help=f"leave out the OpenAI-compatible API (serve --openai-port {OPENAI}, a Service port and a scrape target)",
    )


def run(args: argparse.Namespace) -> None:
    if args.replicas < 1 or args.max_replicas < args.replicas:
        raise TritonHFError("--replicas must be >= 1 and --max-replicas >= --replicas")
    options = DeployOptions(
        model_repository=args.model_repository,
        name=args.name,
        namespace=args.namespace,
        image=args.image,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        device=args.device,
        credentials_secret=args.credentials_secret,
        grace_s=args.grace,
        queue_target_us=round(args.queue_target_ms * 1000),
        prometheus_url=args.prometheus_url,
        allow_from=tuple(args.allow_from),
        monitoring_namespace=args.monitoring_namespace,
        openai=args.openai,
    )
    built = args.built or args.model_repository
    if args.built is None and storage.parse(built).local and not Path(built).exists():
        raise TritonHFError(f"{built} is a path inside the image: pass the built repository with --built DIR")
    files = storage.Files(built)
    options = dataclasses.replace(options, model_repository=exact_build(args.model_repository, args.built, files))
    counts = deploy(files, options, args.output)
    print(f"wrote {args.output}: " + ", ".join(f"{target} {count} objects" for target, count in counts.items()))
    print(f"the pods serve {options.model_repository}")
    print(next_steps(options, args.output, read_facts(files)))


def exact_build(uri: str, built: Path | None, files: storage.Files) -> str:
    """The build the pods serve, written into their template: a new build is a new template, so a rollout.

    s3://: with ``--built``, that build's id below the prefix (push it there); without, the build the
    prefix's pointer names (``files`` resolved it). A build's own URI is kept, if it is ``--built``'s.
    Other URIs as given (gs://, as://: no pointer is read; name a build's prefix yourself).
    """
    location = storage.parse(uri)
    if location.scheme != "s3":
        return uri
    if built is None:
        return files.location.uri
    build = sealed_id(built)
    if build is None:  # built before seals: the pointer says which build
        return storage.resolve(uri)
    if location.build not in (None, build):
        raise TritonHFError(f"{uri} is build {location.build}, --built {built} is build {build}")
    return uri if location.build else location.child(build)
