"""Row validation after parsing: a Great Expectations suite decides which records are quarantined.

The rules live in ``expectations/prepared_dataset.json`` (a GX 1.x suite, one expectation per rule,
``meta.reason`` the quarantine code). This module computes, for every candidate record, the small
columns those expectations check (``empty_field``, ``n_tokens``, ``dup_of``, ...), runs the suite on
that frame with GX, and quarantines each row an expectation flags under the reason of the *first*
failing expectation in suite order.

The suite runs twice. The first run, with the cross-row columns (``dup_of``,
``label_conflict_with``) left empty, finds the rows that fail a row rule; duplicates and label
conflicts are then looked up among the remaining rows only, so the row a duplicate points at is
always one that is kept. The second run gives the final verdicts, statistics and Data Docs.

Lengths: texts longer than ``max_chars`` are ``too_long`` without ever being tokenized; the others
are measured in tokens when a tokenizer is given (through its chat template when it has one),
else in characters.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from tuneline.params import ValidationParams
from tuneline.records import ChatRecord, Rejection

SUITE_PATH = Path(__file__).with_name("expectations") / "prepared_dataset.json"
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0, DEL and C1 minus \t \n \r


@dataclass
class ValidationResult:
    """Accepted records, quarantined rows (parse and rule rejections) and the gate's verdict."""

    accepted: list[ChatRecord]
    quarantined: list[Rejection]
    read: int
    reasons: dict[str, int]  # quarantine reason -> rows
    success: bool  # both thresholds hold
    failures: list[str]  # threshold failures, human-readable
    gx_statistics: dict  # GX suite statistics of the final run
    expectations: list[dict]  # per-expectation summary, in suite order
    docs_path: Optional[str] = None  # index.html of the report built in docs_dir
    docs_kind: Optional[str] = None  # "gx_data_docs" or "html_report" (fallback)

    def quarantined_fraction(self) -> float:
        return len(self.quarantined) / self.read if self.read else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-able counts and verdict, for asset metadata."""
        return {
            "read": self.read,
            "accepted": len(self.accepted),
            "quarantined": len(self.quarantined),
            "quarantined_fraction": round(self.quarantined_fraction(), 6),
            "reasons": dict(self.reasons),
            "success": self.success,
            "failures": list(self.failures),
            "gx_statistics": dict(self.gx_statistics),
            "expectations": list(self.expectations),
            "docs_path": self.docs_path,
            "docs_kind": self.docs_kind,
        }


def validate_records(
    records: Iterable[ChatRecord],
    params: ValidationParams,
    tokenizer: Any = None,
    parse_rejections: Iterable[Rejection] = (),
    read: Optional[int] = None,
    docs_dir: str | Path | None = None,
) -> ValidationResult:
    """Run the suite on ``records``; combine its verdicts with ``parse_rejections``."""
    records = list(records)
    parse_rejections = list(parse_rejections)
    read = len(records) + len(parse_rejections) if read is None else read
    suite = load_suite()
    vocabulary = {label.strip().casefold(): label.strip() for label in params.labels}

    facts = [_row_facts(i, record, params, vocabulary, tokenizer) for i, record in enumerate(records)]
    first = _run_suite(_frame(facts), suite, params)
    _cross_row_facts(facts, records, kept=[i for i in range(len(records)) if i not in first.flagged], params=params)
    final = _run_suite(_frame(facts), suite, params, docs_dir=docs_dir)

    accepted: list[ChatRecord] = []
    rule_rejections: list[Rejection] = []
    for i, record in enumerate(records):
        rule = final.flagged.get(i)
        if rule is None:
            accepted.append(_with_label(record, facts[i].label))
        else:
            reason = suite["expectations"][rule]["meta"]["reason"]
            rule_rejections.append(_rejection(record, facts[i], reason, records, params))
    quarantined = sorted(parse_rejections + rule_rejections, key=lambda r: (r.source, r.line))
    reasons = dict(Counter(r.reason for r in quarantined).most_common())

    result = ValidationResult(
        accepted=accepted, quarantined=quarantined, read=read, reasons=reasons, success=True, failures=[],
        gx_statistics=final.statistics, expectations=final.summary,
    )
    result.failures = _threshold_failures(result, params)
    result.success = not result.failures
    if docs_dir is not None:
        result.docs_path, result.docs_kind = final.docs_path, "gx_data_docs"
        if final.docs_path is None:
            result.docs_path, result.docs_kind = _write_html_report(result, Path(docs_dir)), "html_report"
    return result


def load_suite(path: str | Path = SUITE_PATH) -> dict:
    """The suite as plain JSON: ``{"name", "meta", "expectations": [{type, kwargs, meta}]}``."""
    suite = json.loads(Path(path).read_text(encoding="utf-8"))
    for i, expectation in enumerate(suite["expectations"]):
        if "reason" not in expectation.get("meta", {}):
            raise ValueError(f"{path}: expectation {i} ({expectation['type']}) has no meta.reason")
    return suite


def _threshold_failures(result: ValidationResult, params: ValidationParams) -> list[str]:
    failures = []
    fraction = result.quarantined_fraction()
    if fraction > params.max_quarantined_fraction:
        failures.append(
            f"quarantined {fraction:.1%} of {result.read} rows, "
            f"above max_quarantined_fraction {params.max_quarantined_fraction * 100:g}%"
        )
    if len(result.accepted) < params.min_accepted:
        failures.append(f"accepted {len(result.accepted)} rows, below min_accepted {params.min_accepted}")
    return failures


# ---------------------------------------------------------------------------
# per-row facts -> the frame the suite checks


@dataclass
class _Facts:
    row: int  # position in the records list (the frame's "row" column)
    line: int
    kind: str
    empty_field: Optional[str] = None
    control_field: Optional[str] = None
    control_char: str = ""
    n_chars: int = 0
    tokenizer_error: Optional[str] = None
    n_tokens: Optional[int] = None
    unit: str = "characters"  # what n_tokens counts
    label: Optional[str] = None  # normalized to the vocabulary's spelling
    label_ok: bool = True
    chosen_equals_rejected: bool = False
    dup_of: Optional[int] = None  # row index of the kept original
    dup_exact: bool = False
    label_conflict_with: Optional[int] = None  # row index of the kept row with another label
    conflict_label: Optional[str] = None  # that row's label


def _row_facts(i: int, record: ChatRecord, params: ValidationParams, vocabulary: dict[str, str], tokenizer) -> _Facts:
    facts = _Facts(row=i, line=record.line, kind=record.kind)
    facts.empty_field = _empty_field(record)
    for name, text in _texts(record):
        found = CONTROL.search(text)
        if found:
            facts.control_field, facts.control_char = name, f"U+{ord(found.group()):04X}"
            break

    conversations = _conversations(record)
    facts.n_chars = max(len(_joined(c)) for c in conversations)
    if facts.n_chars <= params.max_chars:  # never tokenize a huge row
        if tokenizer is None:
            facts.n_tokens = facts.n_chars
        else:
            facts.unit = "tokens"
            try:
                facts.n_tokens = max(_token_count(tokenizer, c, record.kind) for c in conversations)
            except Exception as exc:  # a template that rejects the turns, an unencodable string
                facts.tokenizer_error = f"{type(exc).__name__}: {exc}"[:200]

    if record.kind == "classification" and record.label is not None:
        facts.label = record.label.strip()
        if vocabulary and facts.label:
            canonical = vocabulary.get(facts.label.casefold())
            facts.label_ok = canonical is not None
            facts.label = canonical or facts.label
    if record.kind == "preference":
        facts.chosen_equals_rejected = _normalize(record.chosen or "") == _normalize(record.rejected or "")
    return facts


def _empty_field(record: ChatRecord) -> Optional[str]:
    """The first field that is empty or whitespace-only (ingest names blank source fields in meta)."""
    blank = record.meta.get("blank_fields") or []
    if blank:
        return blank[0]
    if not record.messages:
        return "messages"
    for i, message in enumerate(record.messages):
        if message["role"] != "system" and not message["content"].strip():
            return f"messages[{i}].content"
    if record.kind == "preference":
        for name in ("chosen", "rejected"):
            if not (getattr(record, name) or "").strip():
                return name
    if record.kind == "classification" and not (record.label or "").strip():
        return "label"
    return None


def _texts(record: ChatRecord) -> list[tuple[str, str]]:
    texts = [(f"messages[{i}].content", m["content"]) for i, m in enumerate(record.messages)]
    texts += [(name, getattr(record, name)) for name in ("chosen", "rejected", "label") if getattr(record, name)]
    return texts


def _conversations(record: ChatRecord) -> list[list[dict[str, str]]]:
    """The sequences the row trains on: one, or for a pair the prompt with each response."""
    if record.kind == "preference":
        return [
            record.messages + [{"role": "assistant", "content": response or ""}]
            for response in (record.chosen, record.rejected)
        ]
    return [record.messages]


def _joined(conversation: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in conversation)


def _token_count(tokenizer, conversation: list[dict[str, str]], kind: str) -> int:
    if kind in ("sft", "preference") and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(conversation, tokenize=True)
    else:
        ids = tokenizer.encode(_joined(conversation))
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if hasattr(ids, "ids"):  # a raw tokenizers.Encoding
        ids = ids.ids
    return len(ids)


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def _cross_row_facts(facts: list[_Facts], records: list[ChatRecord], kept: list[int], params: ValidationParams) -> None:
    """Duplicates and label conflicts, looked up among rows that pass every row rule, in order."""
    norm = _normalize if params.dedup == "normalized" else (lambda text: text)
    first_by_content: dict[str, int] = {}
    first_by_text: dict[str, int] = {}
    for i in kept:
        record, row = records[i], facts[i]
        key = _content_key(record, row.label, norm)
        if key in first_by_content:
            row.dup_of = first_by_content[key]
            row.dup_exact = _content_key(record, row.label, str) == _content_key(
                records[row.dup_of], facts[row.dup_of].label, str)
            continue
        if record.kind == "classification":
            text = norm(record.messages[0]["content"])
            other = first_by_text.setdefault(text, i)
            if facts[other].label != row.label:
                row.label_conflict_with, row.conflict_label = other, facts[other].label
                continue
        first_by_content[key] = i


def _content_key(record: ChatRecord, label: Optional[str], norm) -> str:
    return json.dumps([
        record.kind,
        [[m["role"], norm(m["content"])] for m in record.messages],
        norm(record.chosen) if record.chosen is not None else None,
        norm(record.rejected) if record.rejected is not None else None,
        norm(label) if label is not None else None,
    ], ensure_ascii=False)


def _frame(facts: list[_Facts]):
    import pandas as pd

    lines = {f.row: f.line for f in facts}
    columns = {
        "row": [f.row for f in facts],
        "line": [f.line for f in facts],
        "kind": [f.kind for f in facts],
        "empty_field": [f.empty_field for f in facts],
        "control_field": [f.control_field for f in facts],
        "n_chars": [f.n_chars for f in facts],
        "tokenizer_error": [f.tokenizer_error for f in facts],
        "n_tokens": [float("nan") if f.n_tokens is None else f.n_tokens for f in facts],
        "label_ok": [f.label_ok for f in facts],
        "chosen_equals_rejected": [f.chosen_equals_rejected for f in facts],
        "dup_of": [None if f.dup_of is None else lines[f.dup_of] for f in facts],
        "label_conflict_with": [None if f.label_conflict_with is None else lines[f.label_conflict_with] for f in facts],
    }
    frame = pd.DataFrame(columns)
    for name in ("empty_field", "control_field", "tokenizer_error", "dup_of", "label_conflict_with"):
        frame[name] = frame[name].astype(object)
    return frame


# ---------------------------------------------------------------------------
# running the suite with Great Expectations


@dataclass
class _SuiteRun:
    flagged: dict[int, int]  # row -> index (in suite order) of its first failing expectation
    statistics: dict
    summary: list[dict]
    docs_path: Optional[str] = None


def _run_suite(frame, suite: dict, params: ValidationParams, docs_dir: str | Path | None = None) -> _SuiteRun:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site("tuneline", {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
        })
    batch = (context.data_sources.add_pandas("records")
             .add_dataframe_asset("candidate_rows")
             .add_batch_definition_whole_dataframe("all_rows"))
    gx_suite = gx.ExpectationSuite(name=suite["name"], meta=suite.get("meta", {}))
    for order, spec in enumerate(suite["expectations"]):
        meta = {**spec.get("meta", {}), "order": order}
        gx_suite.add_expectation(
            ExpectationConfiguration(type=spec["type"], kwargs=spec["kwargs"], meta=meta).to_domain_obj()
        )
    if len(gx_suite.expectations) != len(suite["expectations"]):
        raise ValueError(f"suite {suite['name']!r} holds duplicate expectations")
    gx_suite = context.suites.add(gx_suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite['name']}_rows", data=batch, suite=gx_suite)
    )
    outcome = definition.run(
        batch_parameters={"dataframe": frame},
        expectation_parameters={"min_tokens": params.min_tokens, "max_tokens": params.max_tokens,
                                "max_chars": params.max_chars},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]},
    )

    by_order: dict[int, Any] = {}
    for result in outcome.results:
        if result.exception_info.get("raised_exception"):
            raise RuntimeError(f"GX expectation {result.expectation_config.type} failed to run: "
                               f"{result.exception_info.get('exception_message')}")
        by_order[result.expectation_config.meta["order"]] = result
    flagged: dict[int, int] = {}
    for order in sorted(by_order):
        for hit in by_order[order].result.get("unexpected_index_list") or []:
            flagged.setdefault(int(hit["row"]), order)

    summary = []
    for order, spec in enumerate(suite["expectations"]):
        result = by_order[order].result
        summary.append({
            "expectation": spec["type"],
            "column": spec["kwargs"].get("column"),
            "reason": spec["meta"]["reason"],
            "success": bool(by_order[order].success),
            "unexpected_count": int(result.get("unexpected_count") or 0),
            "unexpected_percent": round(float(result.get("unexpected_percent") or 0.0), 4),
            "quarantined": sum(1 for first in flagged.values() if first == order),
        })
    statistics = {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in outcome.statistics.items()}
    run = _SuiteRun(flagged=flagged, statistics=statistics, summary=summary)
    if docs_dir is not None:
        run.docs_path = _build_data_docs(context, Path(docs_dir))
    return run


def _build_data_docs(context, docs_dir: Path) -> Optional[str]:
    """GX Data Docs for the run just stored in ``context``; None when they cannot be built."""
    try:
        context.build_data_docs(site_names=["tuneline"])
    except Exception:  # fall back to the standalone report
        return None
    index = docs_dir / "index.html"
    return str(index) if index.is_file() else None


def _write_html_report(result: ValidationResult, docs_dir: Path) -> str:
    """A small standalone HTML page of the validation result (used when Data Docs cannot be built)."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    rows = "".join(
        f"<tr><td>{html.escape(e['reason'])}</td><td>{html.escape(e['expectation'])}</td>"
        f"<td>{html.escape(str(e['column']))}</td><td>{e['unexpected_count']}</td><td>{e['quarantined']}</td></tr>"
        for e in result.expectations
    )
    quarantined = "".join(
        f"<tr><td>{html.escape(r.source)}</td><td>{r.line}</td><td>{html.escape(r.reason)}</td>"
        f"<td>{html.escape(r.field or '')}</td><td>{html.escape(r.detail)}</td></tr>"
        for r in result.quarantined
    )
    verdict = "passed" if result.success else "failed: " + "; ".join(result.failures)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>prepared_dataset validation</title></head><body>"
        f"<h1>prepared_dataset validation {html.escape(verdict)}</h1>"
        f"<p>read {result.read}, accepted {len(result.accepted)}, quarantined {len(result.quarantined)}</p>"
        "<h2>Expectations</h2><table border='1'><tr><th>reason</th><th>expectation</th><th>column</th>"
        f"<th>unexpected</th><th>quarantined</th></tr>{rows}</table>"
        "<h2>Quarantined rows</h2><table border='1'><tr><th>source</th><th>line</th><th>reason</th>"
        f"<th>field</th><th>detail</th></tr>{quarantined}</table></body></html>"
    )
    index = docs_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return str(index)


# ---------------------------------------------------------------------------
# verdicts -> records and rejections


def _with_label(record: ChatRecord, label: Optional[str]) -> ChatRecord:
    """The record with its label in the vocabulary's spelling (a new content id when it changed)."""
    if record.kind != "classification" or label is None or label == record.label:
        return record
    return dataclasses.replace(record, label=label, id="")


def _rejection(record: ChatRecord, facts: _Facts, reason: str, records: list[ChatRecord],
               params: ValidationParams) -> Rejection:
    field_name, detail = None, reason
    if reason == "empty_field":
        field_name, detail = facts.empty_field, f"{facts.empty_field} is empty or whitespace-only"
    elif reason == "control_characters":
        field_name, detail = facts.control_field, f"control character {facts.control_char} in {facts.control_field}"
    elif reason == "tokenizer_error":
        detail = facts.tokenizer_error or "tokenizer failed"
    elif reason == "too_long" and facts.n_tokens is None:
        detail = f"{facts.n_chars} characters, above max_chars {params.max_chars} (not tokenized)"
    elif reason == "too_long":
        detail = f"{facts.n_tokens} {facts.unit}, above max_tokens {params.max_tokens}"
    elif reason == "too_short":
        detail = f"{facts.n_tokens} {facts.unit}, below min_tokens {params.min_tokens}"
    elif reason == "unknown_label":
        field_name, detail = _label_field(record), f"label {facts.label!r} is not in the label vocabulary"
    elif reason == "chosen_equals_rejected":
        field_name, detail = "rejected", "chosen and rejected are identical after whitespace/case normalization"
    elif reason == "duplicate":
        detail = ("exact duplicate of " if facts.dup_exact else "duplicate (after whitespace/case normalization) of ")
        detail += _where(records[facts.dup_of], record)
    elif reason == "label_conflict":
        other = records[facts.label_conflict_with]
        field_name = _label_field(record)
        detail = (f"same text as {_where(other, record)} with another label "
                  f"({facts.label!r} vs {facts.conflict_label!r})")
    return Rejection(source=record.source, line=record.line, reason=reason, detail=detail, field=field_name,
                     raw=_raw(record))


def _label_field(record: ChatRecord) -> str:
    """The label's column as the file names it (``category`` in BANKING77), else ``label``."""
    value = record.meta.get("label_column")
    return value if isinstance(value, str) and value else "label"


def _where(other: ChatRecord, record: ChatRecord) -> str:
    return f"line {other.line}" if other.source == record.source else f"{other.source} line {other.line}"


def _raw(record: ChatRecord, limit: int = 500) -> str:
    text = json.dumps(record.content(), ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


# ---------------------------------------------------------------------------
# one file, end to end (what ``tuneline ingest`` prints)


def ingest_file(
    path: str | Path,
    *,
    format: str = "auto",
    schema: str = "auto",
    tokenizer: Any = None,
    params: Optional[ValidationParams] = None,
) -> dict[str, Any]:
    """Read and validate one file; the JSON-able report ``tuneline ingest`` prints.

    ``tokenizer`` is a tokenizer object or a local tokenizer directory. Raises IngestError for a
    file that is empty, unreadable or of an unrecognized schema.
    """
    from tuneline.data.ingest import read_source
    from tuneline.params import DataSource

    source = read_source(DataSource(path=str(path), format=format, schema=schema))
    if isinstance(tokenizer, (str, Path)):
        from tuneline.models.loading import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    result = validate_records(source.records, params or ValidationParams(), tokenizer,
                              parse_rejections=source.rejected, read=source.read)
    return {
        "format": source.schema,
        "container": source.container,
        "read": result.read,
        "accepted": len(result.accepted),
        "quarantined": len(result.quarantined),
        "reasons": result.reasons,
        "quarantined_rows": [
            {"line": r.line, "reason": r.reason, "field": r.field, "detail": r.detail} for r in result.quarantined
        ],
    }
