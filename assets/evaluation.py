"""Test-set evaluation of every model the chain produced, side by side."""

import json
from pathlib import Path
from typing import Any

import dagster as dg

from assets._meta import image, mlflow_link
from resources.artifacts import ArtifactStore
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.deploy.lineage import GATE_ARTIFACT
from tuneline.params import to_plain
from tuneline.records import read_records


def candidates(base_model: dict, sft_adapter: dict, dpo_adapter: dict, distilled_student: dict) -> dict[str, Any]:
    """name -> a model directory, or a loader for adapter outputs."""
    from tuneline.train.sft import load_trained

    return {
        "base": base_model["path"],
        "sft": lambda: load_trained(base_model["path"], sft_adapter["output_dir"]),
        "dpo": dpo_adapter["merged_model_dir"],
        "student": distilled_student["output_dir"],
    }


@dg.asset(group_name="evaluation", kinds={"pytorch"})
def evaluation_report(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    base_model: dict,
    dataset_splits: dict,
    sft_adapter: dict,
    dpo_adapter: dict,
    distilled_student: dict,
) -> dg.Output[dict]:
    """Loss, perplexity, task accuracy (with bootstrap CIs), preference accuracy, latency and size of the
    base, SFT, DPO and student models on the test split, plus the training/serving template parity."""
    from tuneline.data.demo import TASK_FAMILIES, check_answer
    from tuneline.evaluate.report import compare, evaluate_model, markdown_table, plot_comparison, template_parity
    from tuneline.deploy.registry import current_champion, load_registered
    from tuneline.evaluate.gate import decide
    from tuneline.models.provision import load_tokenizer

    r = recipe.load()
    out = artifacts.stage_dir("evaluation_report", context.run.run_id)
    test = read_records(dataset_splits["paths"]["test"])
    pref = read_records(dataset_splits["paths"].get("preference_test", dataset_splits["paths"]["test"]))
    pref = [p for p in pref if p.kind == "preference"]
    tasks = {rec.task for rec in test}
    checker = check_answer if tasks and tasks <= set(TASK_FAMILIES) else None
    reports = {}
    models = candidates(base_model, sft_adapter, dpo_adapter, distilled_student)
    champion = current_champion(mlflow.tracker(), r.registered_model_name())
    if champion is not None:
        context.log.info(f"current champion: {r.registered_model_name()} version {champion['version']}")
        models["champion"] = lambda: load_registered(mlflow.tracker(), f"{r.registered_model_name()}@champion")[:2]
    for name, model in models.items():
        loaded = model() if callable(model) else model
        reports[name] = evaluate_model(loaded, test, pref, r.evaluation, name=name, checker=checker)
        acc = reports[name]["task_accuracy"] or reports[name]["exact_match"]
        context.log.info(f"{name}: loss {reports[name]['loss']:.3f}, accuracy {acc['mean']:.3f}")
    candidate = "dpo" if r.gate.candidate == "teacher" else "student"
    decision = decide(reports[candidate], {"base": reports["base"], "champion": reports.get("champion")}, r.gate,
                      seed=r.seed)
    context.log.info(f"promotion gate: {decision.summary()}")
    parity = template_parity(load_tokenizer(base_model["path"]), test[:200] + pref[:50])
    table = markdown_table(reports)
    chart = plot_comparison(reports, out / "comparison.png")
    gate = {**decision.to_dict(), "candidate_stage": "dpo_adapter" if candidate == "dpo" else "distilled_student",
            "champion_version": champion["version"] if champion else None, "policy": to_plain(r.gate)}
    report = {"models": reports, "comparison": compare(reports), "template_parity": parity, "gate": gate,
              "checker": "demo task checker" if checker else None, "table": table}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(table + "\n")

    upstream = {k: v["mlflow_run_id"] for k, v in
                {"sft_adapter": sft_adapter, "dpo_adapter": dpo_adapter, "distilled_student": distilled_student,
                 "dataset_splits": dataset_splits}.items()}
    run_id = mlflow.start_stage_run(context, r, dataset_sha256=dataset_splits["dataset_sha256"],
                                    params={k: v for k, v in r.flat().items() if k.startswith("evaluation.")},
                                    upstream=upstream)
    tracker = mlflow.tracker()
    for name, rep in reports.items():
        acc = rep["task_accuracy"] or rep["exact_match"]
        tracker.log_metrics(run_id, {f"{name}_loss": rep["loss"], f"{name}_perplexity": rep["perplexity"],
                                     f"{name}_accuracy": acc["mean"], f"{name}_hit_eos_rate": rep["hit_eos_rate"]})
    for path in (out / "report.json", out / "report.md", chart):
        tracker.log_artifact(run_id, path, "evaluation")
    tracker.log_dict(run_id, gate, GATE_ARTIFACT)
    tracker.set_tags(run_id, {"tuneline.gate.passed": decision.passed, "tuneline.gate.candidate": candidate})
    tracker.end_run(run_id)
    value = {"report_path": str(out / "report.json"), "table": table, "parity_ok": parity["ok"], "gate": gate,
             "summary": {n: {"loss": rep["loss"], "accuracy": (rep["task_accuracy"] or rep["exact_match"])["mean"]}
                         for n, rep in reports.items()},
             "mlflow_run_id": run_id}
    return dg.Output(value, metadata={
        "table": dg.MetadataValue.md(table),
        "comparison_chart": image(chart, "comparison"),
        **{f"{n}_accuracy": s["accuracy"] for n, s in value["summary"].items()},
        **{f"{n}_loss": s["loss"] for n, s in value["summary"].items()},
        "template_parity_ok": parity["ok"],
        "gate_passed": decision.passed,
        "gate_decision": dg.MetadataValue.text(decision.summary()),
        "report": dg.MetadataValue.path(value["report_path"]),
        **mlflow_link(run_id, mlflow.tracking_uri),
    })


@dg.asset_check(asset=evaluation_report)
def serving_template_matches_training(evaluation_report: dict) -> dg.AssetCheckResult:
    """Training and serving tokenize the same conversation to the same ids (and answers end with eos)."""
    parity = json.loads(Path(evaluation_report["report_path"]).read_text())["template_parity"]
    return dg.AssetCheckResult(passed=bool(parity["ok"]), metadata={
        "checked": parity["checked"], "mismatches": dg.MetadataValue.json(parity["mismatches"][:5])})


@dg.asset_check(asset=evaluation_report, blocking=True)
def candidate_passes_promotion_gate(evaluation_report: dict) -> dg.AssetCheckResult:
    """The candidate beats the base model and the current champion by the recipe's margin, with the
    confidence interval clear of zero and secondary metrics within tolerance. Blocks registration."""
    gate = evaluation_report["gate"]
    return dg.AssetCheckResult(
        passed=bool(gate["passed"]),
        description="; ".join(gate["reasons"]) or f"{gate['candidate']} beats {', '.join(gate['baselines'])}",
        metadata={"candidate": gate["candidate"], "baselines": dg.MetadataValue.json(gate["baselines"]),
                  "champion_version": gate["champion_version"] or 0,
                  "evidence": dg.MetadataValue.json(gate["evidence"]),
                  "reasons": dg.MetadataValue.json(gate["reasons"])},
    )
