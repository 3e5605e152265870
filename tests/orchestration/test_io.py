"""The IO manager stores typed references as JSON, hands a step its own run's value or the latest one, and refuses
a reference of the wrong type."""

from __future__ import annotations

import json

import dagster as dg

from tuneline.refs import ModelRef, SplitsRef

BASE = ModelRef(uri="file:///m/base", sha256="a" * 64, kind="full", method="tiny", stage="base_model",
                mlflow_run_id="r0")


def test_io_manager_refuses_a_reference_of_the_wrong_type(tmp_path) -> None:
    from resources.io import RefIOManager

    @dg.asset
    def base_model() -> ModelRef:
        return BASE

    @dg.asset
    def dataset_splits(base_model: SplitsRef) -> SplitsRef:  # wired to the wrong kind of reference
        raise AssertionError("must not run")

    result = dg.materialize([base_model, dataset_splits], raise_on_error=False,
                            resources={"io_manager": RefIOManager(root=tmp_path.as_uri())})
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.error.message
    assert "expects a SplitsRef" in message and "holds a ModelRef" in message
    stored = json.loads((tmp_path / "base_model" / "latest.json").read_text())
    assert stored["type"] == "ModelRef" and ModelRef.from_dict(stored["value"]) == BASE


def test_a_step_reads_what_an_earlier_run_materialized(tmp_path) -> None:
    # `tuneline run --select evaluation_report` after a whole run: the upstream values come from latest.json
    from resources.io import RefIOManager

    @dg.asset
    def base_model() -> ModelRef:
        return BASE

    @dg.asset
    def sft_adapter(base_model: ModelRef) -> ModelRef:
        return ModelRef(uri=base_model.uri + "/sft", sha256="b" * 64, kind="full", method="full",
                        stage="sft_adapter", mlflow_run_id="r1")

    instance = dg.DagsterInstance.ephemeral()
    resources = {"io_manager": RefIOManager(root=tmp_path.as_uri())}
    first = dg.materialize([base_model, sft_adapter], instance=instance, resources=resources)
    assert (tmp_path / "base_model" / f"{first.run_id}.json").exists()
    again = dg.materialize([base_model, sft_adapter], selection=[sft_adapter], instance=instance, resources=resources)
    assert again.success and again.output_for_node("sft_adapter").uri == "file:///m/base/sft"
