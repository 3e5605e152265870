"""What the drift sensor compares served traffic with: the reference of the model being served.

When a version is registered, :func:`attach_reference` logs the training prompts it was fitted on (a seeded
sample of its train split) and its own tokenizer to its registration run, under ``monitoring/``, and tags the
version with where they are. :func:`champion_reference` reads them back for the current champion: traffic is
tested against the data of the model that answered it, with that model's tokenizer (so the token-level
features are real), never against whatever ``dataset_splits`` materialized last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tuneline.records import read_jsonl
from tuneline.tracking import Tracker

TAG_MONITORING = "tuneline.monitoring"  # on a model version: runs:/<run id>/monitoring
FOLDER = "monitoring"
REFERENCE_FILE = "drift_reference.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


@dataclass(frozen=True)
class ChampionReference:
    model: str
    version: int
    prompts: list[str]
    tokenizer_dir: Path


def attach_reference(tracker: Tracker, name: str, version: int, run_id: str, reference: Path,
                     model_dir: Path) -> str:
    """Log the reference prompts and the model's tokenizer files with the version; returns the artifact URI."""
    client = tracker.client()
    client.log_artifact(run_id, str(reference), FOLDER)
    for file in TOKENIZER_FILES:
        if (model_dir / file).is_file():
            client.log_artifact(run_id, str(model_dir / file), f"{FOLDER}/tokenizer")
    uri = f"runs:/{run_id}/{FOLDER}"
    client.set_model_version_tag(name, str(version), TAG_MONITORING, uri)
    return uri


def champion_reference(tracker: Tracker, name: str, cache: Path) -> Optional[ChampionReference]:
    """The current champion's reference (downloaded once per version into ``cache``), or None when there is no
    champion or it was registered without one."""
    import mlflow.artifacts

    from tuneline.deploy.registry import current_champion

    champion = current_champion(tracker, name)
    if champion is None or not champion["tags"].get(TAG_MONITORING):
        return None
    dest = cache / name / str(champion["version"])
    if not (dest / FOLDER / REFERENCE_FILE).is_file():
        dest.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=champion["tags"][TAG_MONITORING], dst_path=str(dest),
                                            tracking_uri=tracker.tracking_uri)
    folder = dest / FOLDER
    prompts = [row["prompt"] for row in read_jsonl(folder / REFERENCE_FILE)]
    return ChampionReference(name, int(champion["version"]), prompts, folder / "tokenizer")
