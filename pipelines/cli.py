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

from pipelines import prod
from tuneline.data import cli_ingest
from tuneline.classify import cli as cli_classify
from tuneline.monitoring import cli_drift
from tuneline.paths import project_root, state_dir
from tuneline.settings import load_settings
from tuneline.train import cli_plan
from tuneline.tracking import fail_fast_defaults, sqlite_tracking_uri


def setup_environment() -> Path:
    """Embedded defaults: DAGSTER_HOME=.tuneline/dagster holding our dagster.yaml, MLflow on SQLite."""
    home = state_dir()
    os.environ.setdefault("TUNELINE_HOME", str(home))
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(home / "dagster")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    production = os.environ.get("TUNELINE_PROFILE") == "production"
    source = project_root() / ("deploy/dagster.production.yaml" if production else "dagster.yaml")
    if source.is_file() and (not config.exists() or config.read_bytes() != source.read_bytes()):
        shutil.copyfile(source, config)
    os.environ.setdefault("MLFLOW_TRACKING_URI", sqlite_tracking_uri(home / "mlflow.db"))
    fail_fast_defaults()
    for key, value in {"GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "MLFLOW_LOGGING_LEVEL": "WARNING",  # its table-creation notes are not the command's output
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
    from tuneline.data.raw import check_sources

    settings = load_settings(recipe=args.recipe)
    if args.submit:
        return cmd_submit(args, settings)
    resources = build_resources(settings=settings)
    resources["recipe"] = RecipeResource(
        path=settings.recipe, seed=args.seed, max_steps=args.max_steps, sample_fraction=args.sample_fraction
    )
    recipe = resources["recipe"].load()  # fail fast on a bad recipe, before any step runs
    check_sources(recipe, recipe_path=settings.recipe)  # and on a missing or unreadable data file
    if not args.select:  # the whole graph: what its stages' launches share starts now, beside Dagster's start
        resources["launcher"].prepare_run(recipe)
    print(f"tuneline: materializing the asset graph for recipe {settings.recipe} ({recipe.name}), "
          f"profile {settings.profile}", flush=True)
    started = time.time()
    instance = dg.DagsterInstance.get()
    assets, checks = definitions.graph_for(recipe)
    result = dg.materialize(
        [*assets, *checks],
        instance=instance,
        resources=resources,
        selection=_selection(args.select),
        raise_on_error=False,
        tags={"tuneline/recipe": recipe.name},
    )
    print_summary(result, settings, home, time.time() - started)
    return 0 if result.success else 1


def _selection(text: Optional[str]) -> Any:
    """``--select``: asset keys separated by commas (``raw_dataset,base_model``), or a Dagster selection string."""
    if text and "," in text and not any(c in text for c in " ():*+"):
        return [key.strip() for key in text.split(",") if key.strip()]
    return text


def cmd_submit(args: argparse.Namespace, settings: Any) -> int:
    """``tuneline run --submit``: the run goes through the instance's queue (a daemon must be running)."""
    from pipelines.prod import submit, stored_value

    started = time.time()
    config = {"resources": {"recipe": {"config": {k: v for k, v in (
        ("path", settings.recipe), ("seed", args.seed), ("max_steps", args.max_steps),
        ("sample_fraction", args.sample_fraction)) if v is not None}}}}
    run_id, status = submit("train_model_job", recipe=settings.recipe, run_config=config, timeout=args.timeout)
    print(f"tuneline run {run_id}: {status} in {time.time() - started:.0f} s (queued through the instance's "
          "run coordinator)")
    for key, lines in summary_figures(lambda name: stored_value(name, run_id)).items():
        print(f"{key}:")
        for text in lines:
            print(f"  {text}")
    return 0 if status == "SUCCESS" else 1


def print_summary(result: Any, settings: Any, home: Path, seconds: float) -> None:
    """What was materialized, the key figures, and where to look."""
    import dagster as dg

    from tuneline.storage import redact

    materialized = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    checks = [(e.check_name, e.passed) for e in result.get_asset_check_evaluations()]
    line = "-" * 72
    print(f"\n{line}\ntuneline run {result.run_id}: {'SUCCESS' if result.success else 'FAILED'} in {seconds:.0f} s")
    print(f"materialized ({len(materialized)}): {', '.join(materialized) or 'nothing'}")
    for name, passed in checks:
        print(f"  check {name}: {'passed' if passed else 'FAILED'}")
    for key, lines in summary_figures(lambda name: _output(result, name)).items():
        print(f"{key}:")
        for text in lines:
            print(f"  {text}")
    if not result.success:
        for event in result.all_events:
            if event.event_type == dg.DagsterEventType.STEP_FAILURE:
                error = event.step_failure_data.error
                print(f"FAILED step {event.step_key}: {error.message.strip() if error else ''}")
    print(f"where to look:\n  Dagster UI and MLflow UI: make ui   (state in {home})")
    print(f"  MLflow tracking: {redact(settings.tracking_uri)}\n{line}")


def _output(result: Any, name: str) -> Any:
    try:
        return result.output_for_node(name)
    except Exception:  # the step did not run or failed
        return None


def summary_figures(output: Any) -> dict[str, list[str]]:
    """Key figures of a run, from ``output(asset name)`` (the asset's reference, or None). A stage the recipe
    turned off passed its input on (a reference another stage made): it has no figures of its own."""
    out: dict[str, list[str]] = {}

    def value(name: str) -> Any:
        ref = output(name)
        return ref if getattr(ref, "stage", name) == name else None

    base = value("base_model")
    if base:
        m = base.metrics
        out["base_model"] = [f"{base.source}: {m.get('n_params', 0):,} params, vocab {m.get('vocab_size')}, "
                             f"weights sha256 {base.sha256[:12]}"]
        if "pretrain_eval_loss_after" in m:
            out["base_model"].append(
                f"pretraining: eval loss {m['pretrain_eval_loss_before']:.3f} -> {m['pretrain_eval_loss_after']:.3f}, "
                f"{m.get('pretrain_tokens_per_second', 0):,.0f} tok/s (resumed from step "
                f"{m.get('pretrain_resumed_from_step', 0)})")
    prepared = value("prepared_dataset")
    if prepared:
        out["prepared_dataset"] = [f"read {prepared.read}, accepted {prepared.accepted}, quarantined "
                                   f"{prepared.quarantined} {prepared.reasons}"]
    splits = value("dataset_splits")
    if splits:
        out["dataset_splits"] = [", ".join(f"{k} {v}" for k, v in splits.counts.items())]
    hpo = value("hpo_study")
    if hpo and hpo.enabled:
        out["hpo_study"] = [f"{hpo.n_complete} complete, {hpo.n_pruned} pruned; best val loss "
                            f"{hpo.best_value:.4f} with {hpo.best_params}"]
    sft = value("sft_adapter")
    if sft:
        m = sft.metrics
        out["sft_adapter"] = [f"{m['method']}: {m['global_step']} steps (best {m['best_step']}, stopped early "
                              f"{m['stopped_early']}), best val loss {m['best_val_loss']:.4f}, "
                              f"{m['tokens_per_second']:,.0f} real tok/s"]
    reward = value("reward_model")
    if reward:
        m = reward.metrics
        out["reward_model"] = [f"{m['steps']} steps on {m['train_pairs']} pairs; held-out pairwise accuracy "
                               f"{m['pairwise_accuracy_before']:.3f} -> {m['pairwise_accuracy']:.3f}"]
    rl = value("rl_policy")
    if rl:
        m = rl.metrics
        out["rl_policy"] = [f"{m['algorithm']}: {m['steps']} steps; held-out mean reward {m['mean_reward_before']:.3f} "
                            f"-> {m['mean_reward_after']:.3f}, KL to SFT {m['kl_after']:.4f}"]
    evaluation = value("evaluation_report")
    if evaluation:
        out["evaluation_report (test split)"] = evaluation.table.splitlines()
        gate = evaluation.gate
        parent = (gate.evidence.get("parent") or {}).get("name")
        against = ", ".join([*gate.baselines, *([f"its parent {parent}"] if parent else [])])
        out["promotion gate"] = [
            *(f"REFUSED: {r['candidate']}: {'; '.join(r['reasons'])}; its parent stands in"
              for r in gate.evidence.get("refused_candidates", ())),
            f"{'PASSED' if gate.passed else 'REFUSED'}: {gate.candidate} vs {against}",
            *(f"- {r}" for r in gate.reasons)]
    registered = value("registered_model")
    if registered:
        if registered.decision == "registered":
            out["registered_model"] = [f"{registered.name} version {registered.version} is champion (previous: "
                                       f"{registered.champion_previous_version}); tuneline lineage "
                                       f"{registered.name}@champion"]
        else:
            out["registered_model"] = [f"refused: {registered.reason}; nothing was registered, the champion stays "
                                       f"(version {registered.champion_version})"]
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
    return Tracker(load_settings().tracking_uri)


def cmd_serve(args: argparse.Namespace) -> int:
    """Load NAME@ALIAS from the registry and serve it on 127.0.0.1 (every request logged)."""
    import dataclasses

    from tuneline.deploy.server import serve

    setup_environment()
    settings = load_settings(recipe=args.recipe)
    recipe = _recipe(settings)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("alias", args.alias),
                                   ("follow_seconds", args.follow_seconds)) if v is not None}
    params = dataclasses.replace(recipe.serve, **overrides)  # the recipe's whole serve section, log path included
    name = args.model or recipe.registered_model_name()
    serve(f"{name}@{params.alias}", tracker=_tracker(), params=params, log_path=str(settings.log_path(recipe)),
          offload=recipe.offload)
    return 0


def _recipe(settings: Any) -> Any:
    from tuneline.params import load_recipe
    from tuneline.paths import resolve

    return load_recipe(resolve(settings.recipe))


def cmd_rollback(args: argparse.Namespace) -> int:
    from tuneline.deploy.registry import rollback

    moved = rollback(_tracker(), args.name)
    print(f"{moved['name']}: champion moved from version {moved['from_version']} back to {moved['to_version']}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    """The passport of a registered version; with --verify every artifact it names is re-downloaded and
    re-hashed. Exit 1 when a link is broken."""
    import json

    from tuneline.deploy.lineage import build_passport, passport_markdown, verify_passport

    tracker = _tracker()
    passport = build_passport(tracker, args.ref)
    if args.verify:
        passport["verified"] = verify_passport(tracker, passport)
        passport["broken_links"] += passport["verified"]
    print(json.dumps(passport, indent=2, default=str) if args.json else passport_markdown(passport))
    if args.verify and not args.json:
        checked = sum(len(files) for files in passport["content"].values())
        print(f"verified: {checked} content-addressed artifacts and the registered weights re-downloaded from "
              f"the tracking server and re-hashed; {len(passport['verified'])} broken")
    return 1 if passport["broken_links"] else 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Re-run the chain behind a registered version from its passport; exit 1 unless everything matches."""
    import json

    from tuneline.deploy.reproduce import report_markdown, reproduce

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    report = reproduce(_tracker(), args.ref, stages=stages, atol=args.atol,
                       work_dir=Path(args.work_dir) if args.work_dir else None)
    print(json.dumps(report, indent=2, default=str) if args.json else report_markdown(report))
    return 0 if report["all_match"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the whole asset graph for a recipe")
    run.add_argument("--recipe", default=None, help="recipe YAML (default: $TUNELINE_RECIPE or configs/demo.yaml)")
    run.add_argument("--seed", type=int, help="override the recipe's seed")
    run.add_argument("--max-steps", type=int, help="cap every training loop")
    run.add_argument("--sample-fraction", type=float, help="keep this fraction of the data rows")
    run.add_argument("--select", default=None, help="asset keys separated by commas, or a Dagster selection string (default: everything)")
    run.add_argument("--submit", action="store_true",
                     help="submit train_model_job through the instance's run queue (needs a running daemon: "
                     "make prod-up, or make ui) and wait for it")
    run.add_argument("--timeout", type=float, default=4 * 3600, help="with --submit: seconds to wait")
    run.set_defaults(func=cmd_run)

    cli_ingest.add_parser(sub)
    cli_classify.add_parser(sub)
    cli_drift.add_parser(sub)
    cli_plan.add_parser(sub)
    prod.add_parser(sub)

    serve = sub.add_parser("serve", help="serve a registered model on 127.0.0.1")
    serve.add_argument("--model", help="registered model name (default: the recipe's)")
    serve.add_argument("--recipe", default=None, help="recipe (default: $TUNELINE_RECIPE or configs/demo.yaml)")
    serve.add_argument("--alias", default=None, help="registry alias to serve (default: the recipe's serve.alias)")
    serve.add_argument("--host", default=None, help="bind address (default: the recipe's serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="TCP port (default: the recipe's serve.port)")
    serve.add_argument("--follow-seconds", type=float, default=None,
                       help="how often to check the alias and swap in a new version (default: serve.follow_seconds; 0 = never)")
    serve.set_defaults(func=cmd_serve)

    rollback = sub.add_parser("rollback", help="move the champion alias back to the previous champion")
    rollback.add_argument("name", help="registered model name")
    rollback.set_defaults(func=cmd_rollback)

    lineage = sub.add_parser("lineage", help="the lineage passport of NAME@ALIAS or NAME/VERSION")
    lineage.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    lineage.add_argument("--json", action="store_true", help="one JSON object")
    lineage.add_argument("--verify", action="store_true",
                         help="re-download every artifact the passport names and check its sha256")
    lineage.set_defaults(func=cmd_lineage)

    repro = sub.add_parser("reproduce", help="re-run the chain behind NAME@ALIAS from its passport alone")
    repro.add_argument("ref", help="NAME@ALIAS or NAME/VERSION")
    repro.add_argument("--stages", help="comma-separated: base, sft, dpo, student (default: all training stages)")
    repro.add_argument("--atol", type=float, default=1e-4, help="weights within this max abs difference match")
    repro.add_argument("--work-dir", help="where the rerun writes (default: a new temporary folder)")
    repro.add_argument("--json", action="store_true", help="one JSON object")
    repro.set_defaults(func=cmd_reproduce)

    ui = sub.add_parser("ui", help="start the Dagster and MLflow UIs on 127.0.0.1")
    ui.add_argument("--dagster-port", type=int, default=3000)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run a subcommand. An expected failure (a bad recipe or argument, a missing file, an unknown model, an
    unreachable server) ends with one line on stderr naming the file, key or URI, and exit status 2."""
    args = build_parser().parse_args(argv)
    setup_environment()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted below: expected failures get one line, bugs a traceback
        message = user_error(exc)
        if message is None:
            raise
        print(f"tuneline {args.command}: {message}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> Optional[str]:
    """The one-line message for an expected failure, or None for a bug (which keeps its traceback)."""
    from tuneline.storage import redact

    expected: tuple[type, ...] = (ValueError, LookupError, OSError, RuntimeError)
    try:
        from mlflow.exceptions import MlflowException

        expected += (MlflowException,)
    except ImportError:  # pragma: no cover - mlflow is a dependency
        pass
    if not isinstance(exc, expected) or isinstance(exc, (NotImplementedError, RecursionError)):
        return None
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text if len(text) <= 600 else text[:597] + "...")


if __name__ == "__main__":
    sys.exit(main())
