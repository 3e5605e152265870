"""``tuneline ingest PATH``: read and validate one data file; print what was kept and why rows were not.

Exit status: 0 when the file could be read (whatever was quarantined), 2 with a one-line error on
stderr for a file that is empty, unreadable or of an unrecognized schema (or a bad option value).
``python -m tuneline.data.cli_ingest PATH ...`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from tuneline.cli import OptionError, add_subcommand, run_standalone, tokenizer_option
from tuneline.params import CONTAINER_FORMATS, SCHEMAS, ValidationParams

SHOWN_ROWS = 50  # quarantined rows listed in the text report (--json lists all)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``ingest`` on the ``tuneline`` command's subparsers."""
    return add_subcommand(subparsers, "ingest", help="read and validate one data file", doc=__doc__, configure=_configure)


def _configure(parser: argparse.ArgumentParser) -> None:
    defaults = ValidationParams()
    parser.add_argument("path", help="the data file (jsonl, json, csv, tsv, parquet or txt)")
    parser.add_argument("--format", default="auto", choices=sorted(set(CONTAINER_FORMATS) | set(SCHEMAS)),
                        metavar="F", help="a container (jsonl, json, csv, tsv, parquet, txt) or a schema "
                        "(alpaca, dolly, self_instruct, messages, sharegpt, prompt_completion, preference, "
                        "hh_rlhf, alpaca_eval, classification, text); default: detect both")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="local tokenizer directory: lengths in tokens (default: characters)")
    parser.add_argument("--labels", metavar="a,b,c|@FILE",
                        help="label vocabulary for classification data, comma-separated or @file (one per line)")
    parser.add_argument("--min-tokens", type=int, default=defaults.min_tokens, help="shortest accepted row")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"longest accepted row (default: {defaults.max_tokens} tokens with --tokenizer; "
                        "without one, lengths are characters and the bound is --max-chars)")
    parser.add_argument("--max-chars", type=int, default=defaults.max_chars,
                        help="longest accepted row in characters, checked before tokenizing")
    parser.add_argument("--dedup", choices=("exact", "normalized"), default=defaults.dedup, help="duplicate rule")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tuneline.data.ingest import IngestError
    from tuneline.data.validate import ingest_file
    from tuneline.params import RecipeError

    container, schema = ("auto", args.format) if args.format in SCHEMAS else (args.format, "auto")
    try:
        tokenizer = tokenizer_option(args.tokenizer)
        max_tokens = args.max_tokens or (ValidationParams().max_tokens if tokenizer is not None else args.max_chars)
        params = ValidationParams(min_tokens=args.min_tokens, max_tokens=max_tokens, max_chars=args.max_chars,
                                  dedup=args.dedup, labels=_labels(args.labels))
        report = ingest_file(args.path, format=container, schema=schema, tokenizer=tokenizer, params=params)
    except (IngestError, RecipeError, OptionError) as exc:
        print(f"tuneline ingest: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(_text_report(args.path, report))
    return 0


def _labels(value: Optional[str]) -> tuple[str, ...]:
    if not value:
        return ()
    if value.startswith("@"):
        try:
            lines = Path(value[1:]).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise OptionError(f"{value[1:]}: cannot read labels file ({exc.strerror or exc})") from None
        labels = [line.strip() for line in lines]
    else:
        labels = [label.strip() for label in value.split(",")]
    return tuple(label for label in labels if label)


def _text_report(path: str, report: dict) -> str:
    lines = [
        f"{path}: {report['format']} ({report['container']}): read {report['read']}, "
        f"accepted {report['accepted']}, quarantined {report['quarantined']}"
    ]
    for reason, count in report["reasons"].items():
        lines.append(f"  {reason:<24} {count}")
    rows = report["quarantined_rows"]
    for row in rows[:SHOWN_ROWS]:
        where = f"{row['field']}: " if row["field"] else ""
        lines.append(f"  line {row['line']:>6}  {row['reason']:<22} {where}{row['detail']}")
    if len(rows) > SHOWN_ROWS:
        lines.append(f"  ... {len(rows) - SHOWN_ROWS} more (use --json for all)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    return run_standalone(argv, "ingest", doc=__doc__, configure=_configure, run=run)


if __name__ == "__main__":
    sys.exit(main())
