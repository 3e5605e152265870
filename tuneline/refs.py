"""What stages hand each other: typed references, serialized to and from JSON in one place.

An asset returns one of these frozen dataclasses; the IO manager stores it as JSON; the next asset gets
the same type back and reads its fields (never a dict indexed by a string key). Locations are URIs
(:mod:`tuneline.storage`), so a reference means the same thing on any machine that reaches the store.

Loading is strict (:func:`tuneline.params.build`): an unknown key or a value of the wrong type is a
:class:`RefError` naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar

from tuneline.params import RecipeError, build, to_plain

T = TypeVar("T", bound="Ref")


class RefError(ValueError):
    """A reference or spec that does not match its type; the message names the key."""


class Ref:
    """Mixin: JSON round trip for frozen dataclasses (strict on the way in)."""

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        try:
            return build(cls, data, "")
        except RecipeError as exc:
            raise RefError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RefError(f"{cls.__name__}: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls: type[T], uri: str) -> T:
        from tuneline import storage

        return cls.from_json(storage.read_text(uri))

    def save(self, uri: str) -> str:
        from tuneline import storage

        storage.write_text(uri, self.to_json() + "\n")
        return uri


@dataclass(frozen=True)
class FileRef(Ref):
    """One input file: where it is, what it holds, how to read it."""

    uri: str  # file:///... or s3://...
    sha256: str
    bytes: int
    role: str  # sft, preference, corpus, drift (demo files), data (recipe sources), incoming (retrain), reference
    format: str = "auto"  # container format (tuneline.params.CONTAINER_FORMATS)
    schema: str = "auto"  # record schema (tuneline.params.SCHEMAS)
    fields: dict[str, str] = field(default_factory=dict)  # canonical field -> column in the file
    task: Optional[str] = None  # task family for every record
    licence: Optional[str] = None  # licence of the source, where known
    delimiter: Optional[str] = None  # CSV/TSV cell separator (None: the container's own)
    header: bool = True  # CSV/TSV: the first row names the columns
    columns: tuple[str, ...] = ()  # CSV/TSV without a header: the column names


@dataclass(frozen=True)
class RawDataRef(Ref):
    """The recipe's input files with their hashes (``raw_dataset``)."""

    recipe: str
    files: tuple[FileRef, ...]
    sha256: str  # over the files' sha256, in order
    demo: Optional[dict[str, Any]] = None  # the demo generator's manifest, when the demo data was written

    def by_role(self, *roles: str) -> list[FileRef]:
        return [f for f in self.files if f.role in roles]


@dataclass(frozen=True)
class FileSummary(Ref):
    """What one input file yielded when it was read."""

    uri: str
    role: str
    schema: str
    read: int
    parse_rejected: int


@dataclass(frozen=True)
class PreparedRef(Ref):
    """Canonical chat records and their quarantine (``prepared_dataset``)."""

    records_uri: str
    quarantine_uri: str
    sha256: str  # of the records file
    quarantine_sha256: str
    read: int
    accepted: int
    quarantined: int
    sampled_out: int
    reasons: dict[str, int]
    success: bool  # the validation suite passed and the thresholds held
    failures: tuple[str, ...]
    expectations: tuple[dict[str, Any], ...]
    files: tuple[FileSummary, ...]
    mlflow_run_id: str
    docs_uri: Optional[str] = None  # Great Expectations Data Docs

    @property
    def balanced(self) -> bool:
        return self.accepted + self.quarantined == self.read

    def read_records(self) -> list[Any]:
        """The accepted records (``ChatRecord``s), fetched from the store when remote."""
        from tuneline import storage
        from tuneline.records import read_records

        return read_records(storage.fetch(self.records_uri))


@dataclass(frozen=True)
class SplitsRef(Ref):
    """Train/validation/test (and preference) splits (``dataset_splits``)."""

    uris: dict[str, str]  # split name -> JSONL of records
    counts: dict[str, int]
    sha256: dict[str, str]  # split name -> content hash
    dataset_sha256: str  # over every split's hash
    seed: int
    membership_uri: str  # JSON: split name -> record ids (what an auditor checks a model against)
    drift_reference_uri: str  # JSONL of reference prompts for the drift sensor
    mlflow_run_id: str
    strata: dict[str, dict[str, int]] = field(default_factory=dict)
    replay: Optional[dict[str, Any]] = None  # retrain: new vs replayed train rows

    def uri(self, name: str) -> str:
        if name not in self.uris:
            raise RefError(f"dataset_splits has no {name!r} split (it has {', '.join(sorted(self.uris))})")
        return self.uris[name]


@dataclass(frozen=True)
class ModelRef(Ref):
    """A model a stage produced or loaded: full weights, or an adapter on a base it names."""

    uri: str  # the from_pretrained directory (full) or the adapter directory
    sha256: str  # weights hash of that directory (tuneline.models.loading.weights_sha256)
    kind: Literal["full", "adapter"]
    method: str  # tiny, pretrained, full, freeze, lora, qlora, ..., dpo, distilled, ...
    stage: str  # the asset that produced it
    mlflow_run_id: Optional[str] = None
    base: Optional["ModelRef"] = None  # what an adapter sits on
    source: Optional[str] = None  # hub id or path it was loaded from (base models)
    revision: Optional[str] = None  # hub revision pinned
    metrics: dict[str, Any] = field(default_factory=dict)  # the stage's figures (steps, losses, ...)
    params: dict[str, Any] = field(default_factory=dict)  # resolved params the stage trained with

    def __post_init__(self) -> None:
        if self.kind == "adapter" and self.base is None:
            raise RefError(f"ModelRef {self.uri}: an adapter needs its base")


@dataclass(frozen=True)
class FeedbackRef(Ref):
    """Preference pairs made from feedback on served answers, validated like any preference file
    (``feedback_preferences``)."""

    records_uri: str  # accepted preference records (JSONL of ChatRecords)
    quarantine_uri: str  # quarantined rows with their reasons
    sha256: str  # of the records file
    feedback_read: int  # feedback rows in the inference log
    read: int  # preference rows made from them (= accepted + quarantined)
    accepted: int
    quarantined: int
    reasons: dict[str, int]
    unpaired_ratings: int  # ratings with no other rating of the same prompt to pair with
    missing_requests: int  # feedback whose request is no longer in the log
    last_feedback_id: int
    model_versions: dict[str, int]  # model version that answered -> pairs with an answer from it

    @property
    def balanced(self) -> bool:
        return self.accepted + self.quarantined == self.read


@dataclass(frozen=True)
class StudyRef(Ref):
    """The hyperparameter search (``hpo_study``)."""

    enabled: bool
    best_params: dict[str, Any] = field(default_factory=dict)
    study_name: Optional[str] = None
    storage: Optional[str] = None  # redacted
    best_value: Optional[float] = None
    best_trial: Optional[int] = None
    n_complete: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    mlflow_run_id: Optional[str] = None
    note: str = ""


@dataclass(frozen=True)
class GateRef(Ref):
    """The promotion decision on the evaluation report."""

    passed: bool
    candidate: str  # report name of the candidate (dpo, student, ...)
    candidate_stage: str  # asset that produced it
    baselines: tuple[str, ...]
    reasons: tuple[str, ...]
    evidence: dict[str, Any]
    policy: dict[str, Any]
    champion_version: Optional[int] = None

    def summary(self) -> str:
        verdict = "PROMOTE" if self.passed else "REFUSE"
        instead = "".join(f" (in place of {r['candidate']}, refused: {'; '.join(r['reasons'])})"
                          for r in self.evidence.get("refused_candidates", ()))
        return f"{verdict} {self.candidate} vs {', '.join(self.baselines) or 'nothing'}" + (
            f": {'; '.join(self.reasons)}" if self.reasons else "") + instead


@dataclass(frozen=True)
class EvaluationRef(Ref):
    """Every model evaluated side by side on the test split, and the gate's decision (``evaluation_report``)."""

    report_uri: str
    table: str  # Markdown
    summary: dict[str, dict[str, Any]]  # model name -> loss, accuracy
    parity: dict[str, Any]  # template parity of the candidate's own tokenizer
    gate: GateRef
    candidate: ModelRef  # the model the gate decided on
    mlflow_run_id: str


@dataclass(frozen=True)
class RegisteredRef(Ref):
    """What ``registered_model`` did: a new champion, or a refusal with its reason (the champion unchanged)."""

    decision: Literal["registered", "refused"]
    name: str
    reason: str = ""
    version: Optional[int] = None
    model_uri: Optional[str] = None
    weights_sha256: Optional[str] = None
    base_weights_sha256: Optional[str] = None  # an adapter registered by reference: the base it sits on
    champion_previous_version: Optional[int] = None
    champion_version: Optional[int] = None  # the champion after this step
    broken_links: int = 0
    mlflow_run_id: Optional[str] = None


@dataclass(frozen=True)
class ClassifierRef(Ref):
    """A trained sequence classifier (``classifier_model``): the model, how the strategy was chosen, its test
    figures beside the linear probe's, and the promotion gate's decision on macro-F1."""

    model: ModelRef
    labels: tuple[str, ...]
    strategy: str
    decision: dict[str, Any]  # strategy auto: the matrix cell and its measured evidence ({} when the recipe named one)
    test: dict[str, Any]  # accuracy, macro-F1 with CIs, ECE, latency (no per-example rows)
    gate: GateRef
    report_uri: str  # the full report (per-class F1, confusion, reliability bins), JSON
    mlflow_run_id: str
    probe: Optional[dict[str, Any]] = None  # the linear probe's test figures
    champion: Optional[dict[str, Any]] = None  # the champion's test figures, when there was one


@dataclass(frozen=True)
class ClassifierEnsembleRef(Ref):
    """The short/mid/long ensemble (``classifier_ensemble``): its members, their validation weights, and its test
    figures against the best single member's."""

    members: tuple[ModelRef, ...]
    max_lengths: tuple[int, ...]
    weights: tuple[float, ...]
    test: dict[str, Any]
    best_member: dict[str, Any]
    report_uri: str
    mlflow_run_id: str


@dataclass(frozen=True)
class TemplateArmRef(Ref):
    """The prompt-template arm's test figures, one entry per shot count (``classifier_template``)."""

    base: ModelRef
    results: dict[str, dict[str, Any]]  # "0-shot", "4-shot", ... -> accuracy, macro-F1 with CIs, ECE
    report_uri: str
    mlflow_run_id: str
