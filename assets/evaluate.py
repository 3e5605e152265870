"""Test-set evaluation of every model the chain produced, side by side, and the promotion decision."""

import dagster as dg

from assets._meta import image
from assets._stage import RETRY, finish_stage, launch_stage, stage_uri
from resources.artifacts import ArtifactStore
from resources.launcher import TrainingLauncher
from resources.recipe import RecipeResource
from resources.tracking import MlflowResource
from tuneline.refs import EvaluationRef, ModelRef, SplitsRef
from tuneline.specs import EvalSpec

STAGES = {"base": "base_model", "sft": "sft_adapter", "dpo": "dpo_adapter", "student": "distilled_student",
          "rloo": "rl_policy", "grpo": "rl_policy", "champion": "registered_model"}


@dg.asset(group_name="evaluation", kinds={"pytorch"}, retry_policy=RETRY)
def evaluation_report(
    context: dg.AssetExecutionContext,
    recipe: RecipeResource,
    artifacts: ArtifactStore,
    mlflow: MlflowResource,
    launcher: TrainingLauncher,
    base_model: ModelRef,
    dataset_splits: SplitsRef,
    sft_adapter: ModelRef,
    dpo_adapter: ModelRef,
    distilled_student: ModelRef,
    rl_policy: ModelRef,
    reward_model: ModelRef,
) -> dg.Output:
    """Loss, perplexity, task accuracy (with bootstrap CIs), preference accuracy, latency and size of the base,
    SFT, DPO, RL (rloo/grpo) and student models and the current champion on the test split (out of process), the
    reward model's mean score of each model's answers and their KL to the SFT model, the candidate's template
    parity, and the promotion gate's decision (recipe ``gate:``; ``alignment.method`` picks the teacher)."""
    from tuneline.deploy.registry import current_champion
    from tuneline.evaluate.gate import promotion
    from tuneline.deploy.lineage import GATE_ARTIFACT
    from tuneline.recipes.evaluate import read_report, report_uri

    r = recipe.load()
    champion = current_champion(mlflow.tracker(), r.registered_model_name())
    made = {"base": base_model, "sft": sft_adapter, "dpo": dpo_adapter, r.rl_algorithm(): rl_policy,
            "student": distilled_student}
    models = {n: m for n, m in made.items() if m.stage == STAGES[n]}  # a stage turned off passes its input on
    spec = EvalSpec(out_uri=stage_uri(artifacts, "evaluation_report", context), seed=r.seed, models=models,
                    reward_model=reward_model if reward_model.stage == "reward_model" else None, reference="sft",
                    test_uri=dataset_splits.uri("test"), preference_uri=dataset_splits.uris.get("preference_test"),
                    params=r.evaluation, checker="auto", offload=r.offload,
                    champion=f"{champion['name']}/{champion['version']}" if champion else None)
    outcome, run_id = launch_stage(
        context, recipe=r, mlflow=mlflow, launcher=launcher, spec=spec,
        params=r.flat_section("evaluation", "gate", "alignment"),
        dataset_sha256=dataset_splits.dataset_sha256,
        upstream={"dataset_splits": dataset_splits.mlflow_run_id,
                  **{STAGES[n]: m.mlflow_run_id for n, m in models.items()},
                  **({"reward_model": reward_model.mlflow_run_id} if spec.reward_model else {})},
    )
    report = read_report(spec.out_uri)
    gate = promotion(report, r.gate, seed=r.seed, champion_version=champion["version"] if champion else None,
                     stages=STAGES, teacher=r.alignment.method)
    mlflow.tracker().log_dict(run_id, gate.to_dict(), GATE_ARTIFACT)
    mlflow.tracker().set_tags(run_id, {"tuneline.gate.passed": gate.passed, "tuneline.gate.candidate": gate.candidate})
    context.log.info(f"promotion gate: {gate.summary()}")
    metadata = finish_stage(mlflow, run_id, outcome, title="evaluation")
    ref = EvaluationRef(report_uri=report_uri(spec.out_uri), table=report["table"], gate=gate,
                        summary={n: {"loss": outcome.metrics[f"{n}_loss"], "accuracy": outcome.metrics[f"{n}_accuracy"]}
                                 for n in report["models"]},
                        parity=report["template_parity"][gate.candidate], candidate=models[gate.candidate],
                        mlflow_run_id=run_id)
    chart = _chart(spec.out_uri)
    return dg.Output(ref, metadata={**metadata, "table": dg.MetadataValue.md(ref.table), "comparison_chart": chart,
                                    "gate_passed": gate.passed, "gate_decision": dg.MetadataValue.text(gate.summary()),
                                    "report": dg.MetadataValue.url(ref.report_uri)})


def _chart(out_uri: str) -> dg.MetadataValue:
    from tuneline import storage

    return image(storage.fetch(storage.join(out_uri, "comparison.png")), "comparison")


@dg.asset_check(asset=evaluation_report, blocking=True)
def serving_template_matches_training(evaluation_report: EvaluationRef) -> dg.AssetCheckResult:
    """The candidate's own tokenizer turns each conversation into the same ids for training and for serving
    (and its answers end with the eos): else the served model would be prompted unlike it was trained."""
    parity = evaluation_report.parity
    return dg.AssetCheckResult(passed=bool(parity["ok"]), metadata={
        "candidate": evaluation_report.gate.candidate, "checked": parity["checked"],
        "mismatches": dg.MetadataValue.json(parity["mismatches"][:5])})
