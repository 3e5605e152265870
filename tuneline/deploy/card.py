"""The model card written with every registered version, in Hugging Face's model-card layout.

YAML front matter (base model, library, tags, licences, metrics) and the sections a reader of a model card
expects: model details, training data (every file by URI and sha256, with its licence where the source
records one), training procedure (method and the resolved params of every stage), evaluation (the table with
confidence intervals), the promotion decision, lineage, and known limits. Everything comes from the
version's lineage passport and the evaluation report; nothing is typed in by hand.
"""

from __future__ import annotations

import json
from typing import Any

from tuneline.params import Recipe
from tuneline.refs import EvaluationRef

STAGE_ORDER = ("base_model", "hpo_study", "sft_adapter", "dpo_adapter", "reward_model", "rl_policy",
               "distilled_student")


def model_card(passport: dict[str, Any], evaluation: EvaluationRef, recipe: Recipe) -> str:
    """The card's Markdown for a registered version."""
    import yaml

    models = passport.get("models", {})
    base = models.get("base_model", {})
    candidate = evaluation.candidate
    licences = sorted({d["licence"] for d in passport["data"] if d.get("licence")})
    front = {
        "base_model": base.get("source") or recipe.model.name_or_path or "tiny (built offline by tuneline)",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["tuneline", candidate.method, evaluation.gate.candidate_stage],
        "license": "other",
        "license_details": licences or ["unknown: the data sources record no licence"],
        "model_index": [{"name": f"{passport['model']} v{passport['version']}",
                         "results": [{"metrics": [{"name": f"{name} {metric}", "value": value}
                                                  for name, figures in evaluation.summary.items()
                                                  for metric, value in figures.items()]}]}],
    }
    gate = evaluation.gate
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {passport['model']} version {passport['version']}", "",
             "## Model details", "",
             f"- **Candidate**: `{gate.candidate}` from stage `{gate.candidate_stage}` (method `{candidate.method}`)",
             f"- **Weights**: `{candidate.uri}` sha256 `{candidate.sha256}`",
             f"- **Base model**: {front['base_model']}"
             + (f" (revision `{base.get('revision')}`)" if base.get("revision") else "")
             + (f", weights sha256 `{base.get('sha256')}`" if base.get("sha256") else ""),
             f"- **Started from**: {passport.get('started_from') or 'the recipe (no champion carried over)'}",
             f"- **Code**: git `{passport['git_sha']}`; recipe `{recipe.name}`",
             "", "## Training data", "", "| role | uri | sha256 | licence |", "|---|---|---|---|"]
    lines += [f"| {d.get('role')} | `{d['uri']}` | `{d['sha256']}` | {d.get('licence') or 'unknown'} |"
              for d in passport["data"]]
    lines += ["", "Records, split membership and quarantine, content-addressed in MLflow:", ""]
    lines += [f"- {stage} / {name}: sha256 `{e['sha256']}` (run `{e['run_id']}`)"
              for stage, files in passport.get("content", {}).items() for name, e in files.items()]
    lines += ["", f"Validation: {passport['validation']}", f"Splits: {passport['splits']['rows']}"]
    if passport["splits"].get("replay"):
        lines.append(f"Retrain replay: {passport['splits']['replay']}")
    lines += ["", "## Training procedure", ""]
    for stage in STAGE_ORDER:
        info = passport["stages"].get(stage)
        if info:
            params = {k: v for k, v in info["params"].items() if not k.startswith("best.")}
            lines += [f"### {stage}", "", f"MLflow run `{info['run_id']}`, Dagster run `{info['dagster_run_id']}`",
                      "", "```json", json.dumps(params, indent=1, sort_keys=True), "```", ""]
    lines += ["## Evaluation (test split)", "", evaluation.table, "",
              "## Promotion decision", "", f"{'Passed' if gate.passed else 'Refused'}: {gate.summary()}", "",
              "```json", json.dumps(gate.evidence, indent=1, default=str), "```", "",
              "## Lineage", "", f"`tuneline lineage {passport['model']}/{passport['version']} --verify` re-downloads "
              "and re-hashes every artifact named here. Broken links when the card was written: "
              f"{len(passport['broken_links'])}.", "",
              "## Limitations", "",
              "- Evaluated only on the held-out split of the data above; behaviour outside that distribution is "
              "not measured.",
              "- Accuracy figures carry the bootstrap confidence intervals shown; differences inside them are not "
              "evidence.",
              "- The data licences above bind the weights' use (several public instruction sets are non-commercial).",
              ""]
    return "\n".join(lines)
