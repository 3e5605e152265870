"""Raw files -> canonical chat records, validated; the rows failing a rule are quarantined with a reason.

:func:`prepare` is what ``prepared_dataset`` calls: it reads every data file of the run (not the corpus,
not the held-back drift file), samples the recipe's fraction (by record id, stable as data is added), runs
the validation suite and writes ``records.jsonl`` and ``quarantine.jsonl``. ``accepted + quarantined = read``
always holds (rows sampled out are counted apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline import storage
from tuneline.data import split as splitting
from tuneline.params import DataSource, Recipe
from tuneline.records import write_jsonl
from tuneline.refs import FileSummary, RawDataRef

DATA_ROLES = ("sft", "preference", "data", "incoming")  # files read into records (corpus and drift are not)
RECORDS_FILE = "records.jsonl"
QUARANTINE_FILE = "quarantine.jsonl"
INPUTS_ARTIFACT = "lineage/inputs.json"  # the raw files with their sha256, logged with the prepared records


@dataclass
class Prepared:
    """What :func:`prepare` wrote and found."""

    records_path: Path
    quarantine_path: Path
    read: int
    accepted: int
    quarantined: int
    sampled_out: int
    validation: Any  # tuneline.data.validate.ValidationResult
    files: list[FileSummary]

    def counts(self) -> dict[str, int]:
        return {"read": self.read, "accepted": self.accepted, "quarantined": self.quarantined,
                "sampled_out": self.sampled_out}


def prepare(raw: RawDataRef, recipe: Recipe, tokenizer: Any, out_dir: Path) -> Prepared:
    """Read, sample and validate the run's data files into ``out_dir``."""
    from tuneline.data.ingest import read_source
    from tuneline.data.validate import validate_records

    records, parse_rejections, files, read = [], [], [], 0
    for f in raw.by_role(*DATA_ROLES):
        source = DataSource(path=str(storage.fetch(f.uri)), format=f.format, schema=f.schema, fields=dict(f.fields),
                            task=f.task, delimiter=f.delimiter, header=f.header, columns=tuple(f.columns))
        result = read_source(source)
        for item in (*result.records, *result.rejected):  # where a row came from, on any machine: its file's URI
            item.source = f.uri
        files.append(FileSummary(uri=f.uri, role=f.role, schema=result.schema, read=result.read,
                                 parse_rejected=len(result.rejected)))
        records.extend(result.records)
        parse_rejections.extend(result.rejected)
        read += result.read
    sampled = splitting.sample_records(records, recipe.data.sample_fraction, recipe.seed)
    sampled_out = len(records) - len(sampled)
    validation = validate_records(sampled, recipe.validation, tokenizer=tokenizer, parse_rejections=parse_rejections,
                                  read=read - sampled_out, docs_dir=out_dir / "data_docs")
    write_jsonl(out_dir / RECORDS_FILE, (rec.to_dict() for rec in validation.accepted))
    write_jsonl(out_dir / QUARANTINE_FILE, (q.to_dict() for q in validation.quarantined))
    return Prepared(records_path=out_dir / RECORDS_FILE, quarantine_path=out_dir / QUARANTINE_FILE,
                    read=validation.read, accepted=len(validation.accepted), quarantined=len(validation.quarantined),
                    sampled_out=sampled_out, validation=validation, files=files)


def log_prepared(tracker: Any, run_id: str, prepared: Prepared, raw: RawDataRef) -> dict[str, Any]:
    """Log the validation outcome to the stage's MLflow run: counts, the summary, the Data Docs, the input
    files, and the records and quarantine as content-addressed artifacts (returns their entries)."""
    v = prepared.validation
    tracker.log_metrics(run_id, {**prepared.counts(), "quarantined_fraction": v.quarantined_fraction()})
    tracker.log_dict(run_id, {"reasons": v.reasons, "failures": v.failures,
                              "files": [f.to_dict() for f in prepared.files]}, "validation/summary.json")
    tracker.log_dict(run_id, {"files": [f.to_dict() for f in raw.files], "raw_sha256": raw.sha256},
                     INPUTS_ARTIFACT)
    if v.docs_path:
        tracker.log_artifact(run_id, Path(v.docs_path).parent, "validation/data_docs")
    return tracker.log_contents(run_id, {"records": prepared.records_path, "quarantine": prepared.quarantine_path})
