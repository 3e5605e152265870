"""The ``tuneline`` command. Orchestration subcommands live here (they need Dagster);
pure ones delegate to ``tuneline`` modules."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tuneline.data import cli_ingest
from tuneline.monitoring import cli_drift
from tuneline.paths import project_root, state_dir


def setup_environment() -> Path:
    """Embedded defaults: DAGSTER_HOME=.tuneline/dagster holding our dagster.yaml, MLflow on SQLite."""
    home = state_dir()
    os.environ.setdefault("TUNELINE_HOME", str(home))
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(home / "dagster")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    source = project_root() / "dagster.yaml"
    if source.is_file() and (not config.exists() or config.read_bytes() != source.read_bytes()):
        shutil.copyfile(source, config)
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + str(home / "mlflow.db"))
    for key, value in {"GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
        os.environ.setdefault(key, value)
    return home


def cmd_run(args: argparse.Namespace) -> int:
    home = setup_environment()
    import dagster as dg

    from pipelines import definitions
    from resources import build_resources
    from resources.recipe import RecipeResource

    resources = build_resources()
    resources["recipe"] = RecipeResource(
        path=args.recipe, seed=args.seed, max_steps=args.max_steps, sample_fraction=args.sample_fraction
    )
    recipe = resources["recipe"].load()  # fail fast on a bad recipe, before any step runs
    print(f"tuneline: materializing the asset graph for recipe {args.recipe} ({recipe.name})", flush=True)
    started = time.time()
    instance = dg.DagsterInstance.get()
    result = dg.materialize(
        [*definitions.ASSETS, *definitions.CHECKS],
        instance=instance,
        resources=resources,
        selection=args.select,
        raise_on_error=False,
        tags={"tuneline/recipe": recipe.name},
    )
    print_summary(result, resources, home, time.time() - started)
    if result.success:
        return 0
    if refused_by_gate_only(result):
        print("The promotion gate refused the candidate: nothing was registered and the champion stays.")
        return 0
    return 1


def refused_by_gate_only(result: Any) -> bool:
    """True when the only failure of the run is the promotion gate's blocking check (a decision, not an error)."""
    import dagster as dg

    failed = [e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return bool(failed) and all(key.endswith("candidate_passes_promotion_gate") for key in failed)


def print_summary(result: Any, resources: dict, home: Path, seconds: float) -> None:
    """What was materialized, the key figures, and where to look."""
    import dagster as dg

    materialized = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    checks = [(e.check_name, e.passed) for e in result.get_asset_check_evaluations()]
    line = "-" * 72
    print(f"\n{line}\ntuneline run {result.run_id}: {'SUCCESS' if result.success else 'FAILED'} in {seconds:.0f} s")
    print(f"materialized ({len(materialized)}): {', '.join(materialized) or 'nothing'}")
    for name, passed in checks:
        print(f"  check {name}: {'passed' if passed else 'FAILED'}")
    for key, lines in summary_figures(result).items():
        print(f"{key}:")
        for text in lines:
            print(f"  {text}")
    if not result.success:
        for event in result.all_events:
            if event.event_type == dg.DagsterEventType.STEP_FAILURE:
                error = event.step_failure_data.error
                print(f"FAILED step {event.step_key}: {error.message.strip() if error else ''}")
    print(f"where to look:\n  Dagster UI and MLflow UI: make ui   (state in {home})")
    print(f"  MLflow tracking: {resources['mlflow'].tracking_uri}\n{line}")


def summary_figures(result: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}

    def value(name: str) -> Optional[dict]:
        try:
            return result.output_for_node(name)
        except Exception:  # the step did not run or failed
            return None

    base = value("base_model")
    if base:
        pre = base.get("pretrain") or {}
        out["base_model"] = [f"{base['source']}: {base['n_params']:,} params, vocab {base['vocab_size']}, "
                             f"weights sha256 {base['weights_sha256'][:12]}"]
        if pre:
            out["base_model"].append(
                f"pretraining: eval loss {pre.get('eval_loss_before', float('nan')):.3f} -> "
                f"{pre.get('eval_loss_after', float('nan')):.3f}, {pre.get('tokens_per_second', 0):,.0f} tok/s"
            )
    prepared = value("prepared_dataset")
    if prepared:
        out["prepared_dataset"] = [
            f"read {prepared['read']}, accepted {prepared['accepted']}, quarantined {prepared['quarantined']} "
            f"{prepared['reasons']}"
        ]
    splits = value("dataset_splits")
    if splits:
        out["dataset_splits"] = [", ".join(f"{k} {v}" for k, v in splits["counts"].items())]
    hpo = value("hpo_study")
    if hpo and hpo.get("enabled"):
        out["hpo_study"] = [f"{hpo['n_complete']} complete, {hpo['n_pruned']} pruned; best val loss "
                            f"{hpo['best_value']:.4f} with {hpo['best_params']}"]
    sft = value("sft_adapter")
    if sft:
        out["sft_adapter"] = [f"{sft['method']}: {sft['global_step']} steps (best {sft['best_step']}, stopped early "
                              f"{sft['stopped_early']}), best val loss {sft['best_val_loss']:.4f}, "
                              f"{sft['tokens_per_second']:,.0f} real tok/s"]
    evaluation = value("evaluation_report")
    if evaluation:
        out["evaluation_report (test split)"] = evaluation["table"].splitlines()
        gate = evaluation["gate"]
        out["promotion gate"] = [f"{'PASSED' if gate['passed'] else 'REFUSED'}: {gate['candidate']} vs "
                                 f"{', '.join(gate['baselines'])}"] + [f"- {r}" for r in gate["reasons"]]
    registered = value("registered_model")
    if registered:
        out["registered_model"] = [f"{registered['name']} version {registered['version']} is champion "
                                   f"(previous: {registered['champion_previous_version']}); "
                                   f"tuneline lineage {registered['name']}@champion"]
    return out


def cmd_ui(args: argparse.Namespace) -> int:
    """Start `dagster dev` and the MLflow UI on 127.0.0.1 and print both URLs; Ctrl-C stops both."""
    setup_environment()
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [str(bin_dir / "dagster"), "dev", "-w", str(project_root() / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(args.dagster_port)],
            cwd=project_root(), start_new_session=True,
        ),
        subprocess.Popen(
            [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
             "--host", "127.0.0.1", "--port", str(args.mlflow_port)],
            cwd=project_root(), start_new_session=True,
        ),
    ]
    print(f"Dagster UI: http://127.0.0.1:{args.dagster_port}\nMLflow UI:  http://127.0.0.1:{args.mlflow_port}\n"
          "Ctrl-C stops both.", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:  # each runs in its own session: stop the whole group, children included
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    return 0


def _tracker():
    from tuneline.tracking import Tracker

    setup_environment()
    return Tracker(os.environ["MLFLOW_TRACKING_URI"])


def cmd_serve(args: argparse.Namespace) -> int:
    """Load NAME@ALIAS from the registry and serve it on 127.0.0.1 (every request logged)."""
    from tuneline.deploy.server import serve
    from tuneline.params import ServeParams

    name = args.model or _recipe_model_name(args.recipe)
    serve(f"{name}@{args.alias}", tracker=_tracker(), host=args.host, port=args.port,
          params=ServeParams(host=args.host, port=args.port, alias=args.alias))
    return 0


def _recipe_model_name(recipe_path: str) -> str:
    from tuneline.params import load_recipe
    from tuneline.paths import resolve

    return load_recipe(resolve(recipe_path)).registered_model_name()


def cmd_rollback(args: argparse.Namespace) -> int:
    from tuneline.deploy.registry import RegistryError, rollback

    try:
        moved = rollback(_tracker(), args.name)
    except RegistryError as exc:
        print(f"tuneline rollback: {exc}", file=sys.stderr)
        return 2
    print(f"{moved['name']}: champion moved from version {moved['from_version']} back to {moved['to_version']}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    import json

    from tuneline.deploy.lineage import build_passport, passport_markdown
    from tuneline.deploy.registry import RegistryError

    try:
        passport = build_passport(_tracker(), args.ref)
    except RegistryError as exc:
        print(f"tuneline lineage: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(passport, indent=2, default=str) if args.json else passport_markdown(passport))
    return 1 if passport["broken_links"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the whole asset graph for a recipe")
    run.add_argument("--recipe", default="configs/demo.yaml", help="recipe YAML (default: configs/demo.yaml)")
    run.add_argument("--seed", type=int, help="override the recipe's seed")
    run.add_argument("--max-steps", type=int, help="cap every training loop")
    run.add_argument("--sample-fraction", type=float, help="keep this fraction of the data rows")
    run.add_argument("--select", default=None, help="Dagster asset selection (default: everything)")
    run.set_defaults(func=cmd_run)

    cli_ingest.add_parser(sub)
    cli_drift.add_parser(sub)

    serve = sub.add_parser("serve", help="serve a registered model on 127.0.0.1")
    serve.add_argument("--model", help="registered model name (default: the recipe's)")
    serve.add_argument("--recipe", default="configs/demo.yaml", help="recipe naming the model (default: demo)")
    serve.add_argument("--alias", default="champion", help="registry alias to serve (default: champion)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    rollback = sub.add_parser("rollback", help="move the champion alias back to the previous champion")
    rollback.add_argument("name", help="registered model name")
    rollback.set_defaults(func=cmd_rollback)

    lineage = sub.add_parser("lineage", help="the lineage passport of NAME@ALIAS or NAME/VERSION")
    lineage.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    lineage.add_argument("--json", action="store_true", help="one JSON object")
    lineage.set_defaults(func=cmd_lineage)

    ui = sub.add_parser("ui", help="start the Dagster and MLflow UIs on 127.0.0.1")
    ui.add_argument("--dagster-port", type=int, default=3000)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
