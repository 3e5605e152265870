"""``tuneline lineage --verify``: every content-addressed artifact the passport names is downloaded again and
re-hashed; a tampered one is a broken link that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlflow")


def test_verify_catches_a_tampered_artifact_and_a_missing_version(tmp_path: Path) -> None:
    from tuneline.deploy.lineage import verify_passport
    from tuneline.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "artifacts"))
    run_id = tracker.start_run("verify", "prepared_dataset", tags={})
    records = tmp_path / "records.jsonl"
    records.write_text('{"id": "a"}\n{"id": "b"}\n', encoding="utf-8")
    content = tracker.log_contents(run_id, {"records": records})
    tracker.end_run(run_id)
    passport = {"content": {"prepared_dataset": content}, "model": "never-registered", "version": 1,
                "model_uri": "models:/never-registered/1"}

    broken = verify_passport(tracker, passport)
    assert [b["link"] for b in broken] == ["registered weights models:/never-registered/1"]  # the content verifies

    stored = next((tmp_path / "artifacts").rglob(f"content/{content['records']['sha256']}/records.jsonl"))
    stored.write_text('{"id": "a"}\n{"id": "tampered"}\n', encoding="utf-8")
    broken = verify_passport(tracker, passport)
    sha = content["records"]["sha256"][:12]
    assert {"link": f"prepared_dataset records content/{sha}",
            "error": "sha256 of the downloaded artifact differs"} in broken

    stored.unlink()
    broken = verify_passport(tracker, passport)
    assert any(b["link"].startswith("prepared_dataset records") and b["error"].startswith("cannot download")
               for b in broken)
