"""The production deployment files agree with the code: the Dagster instance config loads and names its
credentials only through the environment, and the Compose stack sets what the profile and that config read,
binds loopback only, and writes no secret."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def test_production_instance_config_is_valid_and_reads_credentials_from_the_environment(monkeypatch, tmp_path):
    import dagster as dg

    config = yaml.safe_load((DEPLOY / "dagster.production.yaml").read_text())
    db = config["storage"]["postgres"]["postgres_db"]
    assert all(set(value) == {"env"} for value in db.values())  # every credential from an environment variable
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert {"key": "tuneline/gpu", "value": "true", "limit": 1} in config["run_coordinator"]["config"][
        "tag_concurrency_limits"]
    assert config["run_monitoring"]["enabled"] is True
    # Dagster itself accepts it (the schema check; no connection is made)
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text((DEPLOY / "dagster.production.yaml").read_text())
    for name in ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB", "DAGSTER_PG_PORT"):
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else "x")
    loaded, _ = dagster_instance_config(str(tmp_path))
    assert "postgres" in str(loaded["storage"]) and isinstance(dg.DagsterInstance, type)


def test_compose_stack_matches_the_profile_and_binds_loopback() -> None:
    from tuneline.settings import PRODUCTION_REQUIRED

    text = (DEPLOY / "docker-compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"postgres", "mlflow", "code", "daemon", "webserver"} <= set(services)
    instance_env = set(re.findall(r"env: (\w+)", (DEPLOY / "dagster.production.yaml").read_text()))
    for name in ("code", "daemon", "webserver"):
        env = services[name]["environment"]
        assert env["TUNELINE_PROFILE"] == "production"
        assert set(PRODUCTION_REQUIRED) <= set(env) and "TUNELINE_OPTUNA_STORAGE" in env
        assert instance_env <= set(env), instance_env - set(env)  # what the instance config reads is set
        volumes = services[name]["volumes"]
        assert any(v.startswith("./dagster.production.yaml:") for v in volumes)
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    # no secret written in the file: passwords come from the environment of `docker compose`
    assert "${PGPASSWORD:?" in text and not re.search(r"PASSWORD: (?!\$\{)\S+", text)
    workspace = yaml.safe_load((DEPLOY / "workspace.compose.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    assert server["host"] == "code" and server["port"] == 3030  # the port the Dockerfile's CMD serves
    assert '"3030"' in (DEPLOY / "Dockerfile").read_text()
    init = (DEPLOY / "postgres-init.sql").read_text()
    assert all(f"tuneline_{db}" in init for db in ("dagster", "mlflow", "optuna"))
