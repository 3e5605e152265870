"""Training on Kubernetes: the trainer pod (through Dagster Pipes) and, for several nodes, an indexed Job.

Everything here renders Kubernetes objects offline and validates them against the Kubernetes client's models
(``dagster_k8s.models.k8s_model_from_dict`` rejects unknown keys), so tests need no cluster.

* :class:`K8sTrainingLauncher` runs each training job in its own pod through Dagster Pipes (dagster-k8s's
  ``PipesK8sClient``): logs and metadata come back from the pod's logs, the outcome from the object store.
* :func:`trainer_pod` is the pod ``PipesK8sClient`` creates for one training job: the recipe's ``k8s:`` section
  (image, CPU/memory/GPU, node selector, tolerations) on the first container, the one that talks Pipes.
  It wraps ``dagster_k8s.pipes.build_pod_body``, which dagster-k8s does not export: pinned here, in one place.
* :func:`multinode_manifests` renders what a job across several nodes needs: a headless Service and an indexed
  Job whose pods run ``torchrun`` with a c10d rendezvous on pod 0 (``docs/production.md``, Kubernetes).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import dagster as dg
from pydantic import Field

from resources.launcher import LaunchResult, TrainingFailed, TrainingLauncher, read_outcome, reported_metadata
from tuneline import storage
from tuneline.params import K8sParams
from tuneline.specs import Spec
from tuneline.train.distributed import launch_command
from tuneline.train.hpo import DEDICATED_CPUS_ENV

PINNED_DAGSTER_K8S = "0.29.27"  # build_pod_body's signature was checked against this version
GPU_RESOURCE = "nvidia.com/gpu"
RENDEZVOUS_PORT = 29500
# the downward-API path of an indexed Job pod's index (its node rank); $(NODE_RANK) in the command expands it
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
LABELS = {"tuneline/component": "trainer"}


def container_resources(params: K8sParams) -> dict[str, dict[str, str]]:
    """Requests = limits (a training pod should not be squeezed or throttled): CPU, memory and GPUs."""
    amounts = {"cpu": params.cpu, "memory": params.memory}
    if params.gpus:
        amounts[GPU_RESOURCE] = str(params.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def pod_spec(params: K8sParams, *, service_account: Optional[str] = None) -> dict[str, Any]:
    """The pod spec fields the recipe decides (snake_case, as the Kubernetes client's models name them)."""
    spec: dict[str, Any] = {
        "containers": [{"resources": container_resources(params)}],
        "restart_policy": "Never",
    }
    if params.node_selector:
        spec["node_selector"] = dict(params.node_selector)
    if params.tolerations:
        spec["tolerations"] = [dict(t) for t in params.tolerations]
    if service_account:
        spec["service_account_name"] = service_account
    return spec


def trainer_pod(pod_name: str, pod_args: Mapping[str, Any], pipes_env: Mapping[str, str]) -> Any:
    """The ``V1Pod`` ``PipesK8sClient.run(**pod_args)`` creates (unknown keys rejected): what
    :meth:`K8sTrainingLauncher.pod_args` asks for, plus the Pipes bootstrap variables the session adds."""
    from dagster_k8s.pipes import build_pod_body

    return build_pod_body(
        pod_name=pod_name,
        image=pod_args["image"],
        command=list(pod_args["command"]),
        env_vars={**pipes_env, **pod_args["env"]},
        base_pod_meta=pod_args["base_pod_meta"],
        base_pod_spec=pod_args["base_pod_spec"],
    )


def multinode_manifests(
    name: str,
    image: str,
    module_args: Sequence[str],
    *,
    nodes: int,
    processes_per_node: int,
    params: K8sParams,
    env: Mapping[str, str],
    namespace: str = "default",
    service_account: Optional[str] = None,
) -> dict[str, Any]:
    """A headless Service and an indexed Job that run ``python -m torch.distributed.run ... --module
    *module_args`` on ``nodes`` pods with ``processes_per_node`` ranks each.

    Pod ``i`` of the Job is ``<name>-<i>.<name>`` in the Service's DNS (``subdomain``); every pod joins the c10d
    rendezvous on pod 0, and its node rank is the Job's completion index (``NODE_RANK``, from the downward API). Returns ``{"service": V1Service,
    "job": V1Job}`` validated against the client's models.
    """
    import kubernetes
    from dagster_k8s.models import k8s_model_from_dict

    if nodes < 2:
        raise ValueError("a multi-node job needs nodes >= 2 (one node: the trainer pod)")
    labels = {**LABELS, "tuneline/job": name}
    command = [
        "python", "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(processes_per_node),
        "--node-rank", "$(NODE_RANK)", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{name}-0.{name}.{namespace}.svc:{RENDEZVOUS_PORT}", "--rdzv-id", name,
        "--module", *module_args,
    ]
    service = {
        "api_version": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"cluster_ip": "None", "selector": labels,
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "target_port": RENDEZVOUS_PORT}]},
    }
    container = {
        "name": "trainer", "image": image, "command": command,
        "env": [{"name": "NODE_RANK", "value_from": {"field_ref": {"field_path": COMPLETION_INDEX}}},
                *({"name": k, "value": v} for k, v in env.items())],
        "ports": [{"container_port": RENDEZVOUS_PORT, "name": "rendezvous"}],
        "resources": container_resources(params),
    }
    pod = {k: v for k, v in pod_spec(params, service_account=service_account).items() if k != "containers"}
    job = {
        "api_version": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "completion_mode": "Indexed", "completions": nodes, "parallelism": nodes, "backoff_limit": 0,
            "template": {"metadata": {"labels": labels},
                         "spec": {**pod, "subdomain": name, "containers": [container]}},
        },
    }
    return {"service": k8s_model_from_dict(kubernetes.client.V1Service, service),
            "job": k8s_model_from_dict(kubernetes.client.V1Job, job)}


def to_manifest(model: Any) -> dict[str, Any]:
    """A Kubernetes model as the camelCase mapping ``kubectl apply`` takes."""
    import kubernetes

    return kubernetes.client.ApiClient().sanitize_for_serialization(model)


# ---------------------------------------------------------------------------
# the launcher

SPEC_ENV = "TUNELINE_SPEC"  # the pod reads its spec from this variable (python -m MODULE --spec env:TUNELINE_SPEC)
# settings K8sTrainingLauncher.from_env reads (the Helm values set them on the code location and its run pods)
LAUNCHER_ENV = ("TUNELINE_K8S_IMAGE", "TUNELINE_K8S_NAMESPACE", "TUNELINE_K8S_ENV_SECRETS")
# variables copied from the launching process into the trainer pod when set there
FORWARDED_ENV = ("TUNELINE_PROFILE", "TUNELINE_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE")


def _cpu_count(quantity: str) -> int:
    """Whole CPUs in a Kubernetes quantity ("2" -> 2, "500m" -> 1): torch in a container sees the node's
    cores, not its limit, so the pod's thread count is set from this."""
    value = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return max(1, math.floor(value))


class K8sTrainingLauncher(TrainingLauncher):
    """Each training job in its own pod (restartPolicy Never), talking Dagster Pipes through the pod's logs.

    The recipe's ``k8s:`` section sets the image (else this launcher's), CPU/memory/GPU requests, node selector
    and tolerations. A pod cannot read this machine's disk: the spec travels in the ``TUNELINE_SPEC`` variable
    and every path in it must be an object-store URI the pod can reach, as must ``out_dir``, where the trainer
    writes ``result.json`` that this launcher reads back. Only the first container talks Pipes; with several
    processes the pod runs torchrun and rank 0 talks. Credentials reach the pod as Secrets (``env_secrets``).
    """

    image: str = Field(description="Trainer image (deploy/Dockerfile), used when the recipe's k8s.image is unset.")
    namespace: str = Field(default="default", description="Namespace for training pods (recipe k8s.namespace wins).")
    service_account: Optional[str] = Field(default=None, description="Service account of training pods.")
    env_secrets: list[str] = Field(default_factory=list, description="Secrets whose keys become the pod's env.")
    forward_env: list[str] = Field(default_factory=lambda: list(FORWARDED_ENV),
                                   description="Variables copied from this process into the pod when set.")
    load_incluster_config: Optional[bool] = Field(default=None, description="None: in-cluster when in a pod.")
    kubeconfig_file: Optional[str] = Field(default=None, description="kubeconfig outside the cluster.")
    poll_interval: float = Field(default=5.0, description="Seconds between pod status polls.")

    @classmethod
    def from_env(cls) -> "K8sTrainingLauncher":
        """The launcher the production profile builds with TUNELINE_LAUNCHER=k8s (see deploy/helm/values.yaml)."""
        image = os.environ.get("TUNELINE_K8S_IMAGE")
        if not image:
            raise RuntimeError("TUNELINE_LAUNCHER=k8s needs TUNELINE_K8S_IMAGE (the trainer image, deploy/Dockerfile)")
        secrets = [s.strip() for s in os.environ.get("TUNELINE_K8S_ENV_SECRETS", "").split(",") if s.strip()]
        return cls(image=image, namespace=os.environ.get("TUNELINE_K8S_NAMESPACE", "default"),
                   service_account=os.environ.get("TUNELINE_K8S_SERVICE_ACCOUNT") or None, env_secrets=secrets)

    def pod_args(self, spec: Spec, num_processes: int, k8s: Optional[K8sParams]) -> dict[str, Any]:
        """What ``PipesK8sClient.run`` gets for this job (and :func:`trainer_pod` renders offline): image,
        command, namespace, env, pod metadata and pod spec."""
        params = k8s or K8sParams()
        if spec.compute.engine == "fsdp":
            raise ValueError("compute.engine: fsdp runs through `accelerate launch --config_file`, which the Kubernetes "
                             "launcher does not render into the pod yet; use compute.engine: ddp or deepspeed there")
        for key, value in _locations(spec.to_dict()):
            if value.startswith("sqlite:") or storage.is_local(value):
                raise ValueError(
                    f"spec {key}={value!r} is on this machine, which a pod cannot reach: use an object-store "
                    "artifact root (TUNELINE_ARTIFACT_ROOT=s3://...) and a database server with the k8s launcher"
                )
        cpus = _cpu_count(params.cpu)
        env = {name: os.environ[name] for name in self.forward_env if name in os.environ}
        # the pod's CPUs are its own: its ranks (or a search worker's trials) share them, not the node's cores
        env.update({SPEC_ENV: spec.to_json(), "OMP_NUM_THREADS": str(max(1, cpus // num_processes)),
                    DEDICATED_CPUS_ENV: str(cpus)})
        base_spec = pod_spec(params, service_account=self.service_account)
        if self.env_secrets:
            base_spec["containers"][0]["env_from"] = [{"secret_ref": {"name": name}} for name in self.env_secrets]
        stage = re.sub("[^a-z0-9-]", "", spec.module.rsplit(".", 1)[-1].replace("_", "-"))
        return {
            "image": params.image or self.image,
            "command": launch_command("python", spec.module, ["--spec", f"env:{SPEC_ENV}"], num_processes),
            "namespace": params.namespace or self.namespace,
            "env": env,
            "base_pod_meta": {"labels": {**LABELS, "tuneline/stage": stage}},
            "base_pod_spec": base_spec,
        }

    def launch(self, context: dg.AssetExecutionContext, spec: Spec, *, num_processes: int = 1,
               k8s: Optional[K8sParams] = None) -> LaunchResult:
        from dagster_k8s.pipes import PipesK8sClient

        args = self.pod_args(spec, num_processes, k8s)
        client = PipesK8sClient(load_incluster_config=self.load_incluster_config,
                                kubeconfig_file=self.kubeconfig_file, poll_interval=self.poll_interval)
        context.log.info(f"launching {spec.module} in a pod ({args['image']}, namespace {args['namespace']}, "
                         f"{num_processes} process(es))")
        try:
            invocation = client.run(context=context, **args)
        except Exception as exc:  # the pod failed, was evicted, or the trainer reported an exception
            raise TrainingFailed(description=f"{spec.module} failed in its pod: {storage.redact(exc)}") from exc
        return LaunchResult(outcome=read_outcome(spec), reported_metadata=reported_metadata(invocation))


def _locations(value: Any, key: str = "spec") -> list[tuple[str, str]]:
    """Every (key path, value) of a spec that names a location: URIs and storage URLs."""
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _locations(v, f"{key}.{k}")]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _locations(v, f"{key}[{i}]")]
    name = key.rsplit(".", 1)[-1]
    if isinstance(value, str) and (name.endswith(("_uri", "_uris", "_url")) or name == "uri" or "[" in name):
        return [(key, value)] if (value and ("://" in value or value.startswith(("/", "sqlite:")))) else []
    return []
