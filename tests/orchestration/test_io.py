"""The IO manager stores typed references as JSON and refuses a reference of the wrong type."""

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
