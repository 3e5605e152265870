"""Kubernetes, offline: the trainer pod of the GPU recipe and the multi-node Job + headless Service validate against
the Kubernetes client's models (unknown keys rejected); the Helm values use only keys the Dagster chart knows and
name the same image, environment variables and secrets as the launcher; the Dockerfile serves that code location."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from resources.k8s import (
    LAUNCHER_ENV,
    SPEC_ENV,
    K8sTrainingLauncher,
    multinode_manifests,
    to_manifest,
    trainer_pod,
)
import dataclasses

from tuneline.params import HpoParams, K8sParams, RecipeError, SftParams, load_recipe
from tuneline.refs import ModelRef
from tuneline.specs import HpoWorkerSpec, SftSpec

ROOT = Path(__file__).resolve().parents[2]
HELM_VALUES = ROOT / "deploy" / "helm" / "values.yaml"
GPU_RECIPE = ROOT / "configs" / "qwen2.5-0.5b-lora.yaml"
BASE = ModelRef(uri="s3://bucket/models/base", sha256="a" * 64, kind="full", method="tiny", stage="base_model")
SPEC = SftSpec(base=BASE, train_uri="s3://bucket/splits/train.jsonl", val_uri="s3://bucket/splits/val.jsonl",
               out_uri="s3://bucket/sft/run-1", seed=42, params=SftParams(method="lora"))
# Pipes adds these to the first container (PipesK8sClient.run); rendered here as it would
PIPES_ENV = {"DAGSTER_PIPES_CONTEXT": "e30=", "DAGSTER_PIPES_MESSAGES": "e30="}


def _validated(kind: str, manifest: dict) -> object:
    """A camelCase manifest read back into the client's model (unknown keys raise)."""
    import kubernetes
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    model = getattr(kubernetes.client, kind)
    return k8s_model_from_dict(model, k8s_snake_case_dict(model, manifest))


def test_gpu_recipe_trainer_pod_validates() -> None:
    recipe = load_recipe(GPU_RECIPE)
    launcher = K8sTrainingLauncher(image="tuneline:0.1.0", namespace="tuneline", env_secrets=["tuneline-secrets"])
    pod = trainer_pod("dagster-run-sft-1", launcher.pod_args(SPEC, 2, recipe.k8s), PIPES_ENV)
    manifest = to_manifest(pod)
    _validated("V1Pod", manifest)  # round trip through the model

    assert manifest["metadata"]["labels"]["tuneline/stage"] == "sft"
    spec = manifest["spec"]
    (container,) = spec["containers"]  # one container: the one that talks Pipes
    assert container["image"] == "tuneline:0.1.0" and spec["restartPolicy"] == "Never"
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["envFrom"] == [{"secretRef": {"name": "tuneline-secrets"}}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert SftSpec.from_json(env[SPEC_ENV]) == SPEC  # the spec travels in the pod, not on this machine's disk
    assert env["OMP_NUM_THREADS"] == "4" and env["TUNELINE_DEDICATED_CPUS"] == "8"  # 8 CPUs over 2 ranks
    assert set(PIPES_ENV) <= set(env)
    # two ranks under torchrun, each reading the spec from the variable
    cmd = container["command"]
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"] and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-4:] == ["--module", "tuneline.recipes.sft", "--spec", f"env:{SPEC_ENV}"]


def test_unknown_keys_and_local_paths_are_rejected() -> None:
    from dagster_k8s.pipes import build_pod_body

    with pytest.raises(Exception, match="Unexpected keys"):  # what trainer_pod relies on
        build_pod_body(pod_name="p", image="i", command=["x"], env_vars={}, base_pod_meta=None,
                       base_pod_spec={"containers": [{"resourcez": {}}]})
    with pytest.raises(RecipeError, match="k8s.tolerations\\[0\\]: unknown key efect"):
        K8sParams(tolerations=({"key": "a", "efect": "NoSchedule"},))
    with pytest.raises(RecipeError, match="k8s.memory"):
        K8sParams(memory="8 GB")
    launcher = K8sTrainingLauncher(image="tuneline:0.1.0")
    with pytest.raises(ValueError, match="train_uri.*a pod cannot reach"):
        launcher.pod_args(dataclasses.replace(SPEC, train_uri="file:///home/me/train.jsonl"), 1, None)
    with pytest.raises(ValueError, match="base.uri.*a pod cannot reach"):
        launcher.pod_args(dataclasses.replace(SPEC, base=dataclasses.replace(BASE, uri="file:///m")), 1, None)
    worker = HpoWorkerSpec(out_uri="s3://b/hpo", seed=1, study_name="s", storage_url="sqlite:////tmp/o.db",
                           hpo=HpoParams(), params=SftParams(), base=BASE, train_uri="s3://b/t", val_uri="s3://b/v",
                           worker=0)
    with pytest.raises(ValueError, match="storage_url.*a pod cannot reach"):
        launcher.pod_args(worker, 1, None)


def test_multinode_job_and_headless_service_validate() -> None:
    recipe = load_recipe(GPU_RECIPE)
    made = multinode_manifests("tl-sft-1", "tuneline:0.1.0", ["tuneline.recipes.sft", "--spec", f"env:{SPEC_ENV}"],
                               nodes=3, processes_per_node=4, params=recipe.k8s, env={SPEC_ENV: "{}"},
                               namespace="tuneline")
    service, job = to_manifest(made["service"]), to_manifest(made["job"])
    _validated("V1Service", service)
    _validated("V1Job", job)
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    assert service["spec"]["selector"] == job["spec"]["template"]["metadata"]["labels"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[cmd.index("--nnodes") + 1] == "3" and cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "tl-sft-1-0.tl-sft-1.tuneline.svc:29500"  # pod 0
    assert cmd[cmd.index("--node-rank") + 1] == "$(NODE_RANK)"
    rank = next(e for e in container["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in rank["valueFrom"]["fieldRef"]["fieldPath"]
    with pytest.raises(ValueError, match="nodes >= 2"):
        multinode_manifests("x", "i", ["m"], nodes=1, processes_per_node=1, params=K8sParams(), env={})


# The Dagster chart's values schema (pydantic models in dagster-io/dagster, helm/dagster/schema/schema/charts/:
# dagster/values.py, dagster/subschema/run_launcher.py and postgresql.py, dagster_user_deployments/subschema/
# user_deployments.py), the sections these values touch. "*" marks a free-form mapping (env, resources, ...).
CHART_KEYS = {
    "dagster-user-deployments": {
        "enabled": None, "enableSubchart": None, "imagePullSecrets": None,
        "deployments": [{
            "name": None, "image": {"repository": None, "tag": None, "pullPolicy": None}, "port": None,
            "dagsterApiGrpcArgs": None, "codeServerArgs": None, "includeConfigInLaunchedRuns": {"enabled": None},
            "env": "*", "envConfigMaps": None, "envSecrets": [{"name": None}], "annotations": "*",
            "nodeSelector": "*", "affinity": "*", "tolerations": None, "podSecurityContext": "*",
            "securityContext": "*", "resources": "*", "livenessProbe": "*", "readinessProbe": "*",
            "startupProbe": "*", "labels": "*", "volumeMounts": None, "volumes": None, "schedulerName": None,
        }],
    },
    "runLauncher": {
        "type": None,
        "config": {"k8sRunLauncher": {
            "image": {"repository": None, "tag": None, "pullPolicy": None}, "imagePullPolicy": None,
            "jobNamespace": None, "loadInclusterConfig": None, "kubeconfigFile": None, "envConfigMaps": None,
            "envSecrets": [{"name": None}], "envVars": None, "volumeMounts": None, "volumes": None, "labels": "*",
            "failPodOnRunFailure": None, "resources": "*", "schedulerName": None, "securityContext": "*",
            "runK8sConfig": {"containerConfig": "*", "podSpecConfig": "*", "podTemplateSpecMetadata": "*",
                             "jobSpecConfig": "*", "jobMetadata": "*"},
        }},
    },
    "postgresql": {"postgresqlScheme": None, "image": {"repository": None, "tag": None, "pullPolicy": None},
                   "enabled": None, "postgresqlHost": None, "postgresqlUsername": None, "postgresqlPassword": None,
                   "postgresqlDatabase": None, "postgresqlParams": "*", "service": {"port": None}},
    "generatePostgresqlPasswordSecret": None,
    "global": {"postgresqlSecretName": None, "dagsterHome": None, "serviceAccountName": None,
               "celeryConfigSecretName": None, "dagsterInstanceConfigMap": None},
}


def _unknown_keys(values: object, schema: object, where: str = "") -> list[str]:
    if schema == "*" or schema is None:
        return []
    if isinstance(schema, list):
        return [k for i, v in enumerate(values or []) for k in _unknown_keys(v, schema[0], f"{where}[{i}]")]
    bad = []
    for key, value in (values or {}).items():
        path = f"{where}.{key}" if where else key
        bad += [path] if key not in schema else _unknown_keys(value, schema[key], path)
    return bad


def test_helm_values_use_chart_keys_and_name_the_launchers_image_env_and_secrets(monkeypatch) -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())
    assert _unknown_keys(values, CHART_KEYS) == []
    assert _unknown_keys({"runLauncher": {"config": {"k8sRunLauncher": {"imagePulPolicy": "x"}}}}, CHART_KEYS)

    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = deployment["env"]
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    assert env["TUNELINE_K8S_IMAGE"] == image  # the code location's image trains too
    assert env["TUNELINE_PROFILE"] == "production" and env["TUNELINE_LAUNCHER"] == "k8s"
    assert set(LAUNCHER_ENV) <= set(env)
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]  # run pods (where the launcher runs) get it
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    secrets = {s["name"] for s in deployment["envSecrets"]}
    assert secrets == {s["name"] for s in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]}
    assert "postgresqlPassword" not in values["postgresql"]  # set at install time (--set), never in this file

    # the profile builds the launcher from exactly these variables
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from resources import build_resources

    launcher = build_resources("production")["launcher"]
    assert isinstance(launcher, K8sTrainingLauncher)
    assert launcher.image == image and launcher.namespace == env["TUNELINE_K8S_NAMESPACE"]
    assert set(launcher.env_secrets) == secrets
    monkeypatch.delenv("TUNELINE_K8S_IMAGE")
    with pytest.raises(RuntimeError, match="TUNELINE_K8S_IMAGE"):
        build_resources("production")


def test_dockerfile_serves_the_code_location_the_values_name() -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"EXPOSE {deployment['port']}" in dockerfile
    module = deployment["dagsterApiGrpcArgs"][deployment["dagsterApiGrpcArgs"].index("-m") + 1]
    assert f'"-m", "{module}"' in dockerfile and (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert re.search(r"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", dockerfile)  # CPU by default
    assert "torch==2.13.0" in dockerfile
    for folder in ("tuneline", "resources", "assets", "pipelines", "configs"):
        assert f"COPY {folder} ./{folder}" in dockerfile
