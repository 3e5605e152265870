"""``tuneline classify --model NAME@ALIAS|PATH --data FILE [--json]``: evaluate a classifier on a labelled file.

Prints accuracy, macro-F1 (with its bootstrap interval), n, per-class F1 and the confusion matrix; ``--json``
prints one object with ``accuracy``, ``macro_f1``, ``n``, ``per_class``, ``confusion`` (and ``labels``, ``ci``,
``ece``). Exit status 2 with a one-line error on stderr for data that cannot be read (an empty, unreadable or
unrecognized file, a row that cannot be parsed, an empty text or label), labels the model does not know, or a
model that cannot be found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from tuneline.cli import add_subcommand, run_standalone


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``classify`` on the ``tuneline`` command's subparsers."""
    return add_subcommand(subparsers, "classify", help="evaluate a classifier on a labelled file", doc=__doc__, configure=_configure)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION in the registry, or a local "
                        "classifier directory")
    parser.add_argument("--data", required=True, help="labelled file (CSV/TSV with text and label columns, JSONL, ...)")
    parser.add_argument("--text-column", default=None, help="the text column (default: text, sentence or content)")
    parser.add_argument("--label-column", default=None, help="the label column (default: label, category, ...)")
    parser.add_argument("--delimiter", default=None, help="CSV cell separator (default: by extension)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $TUNELINE_HOME/mlflow.db)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _model_dir(ref: str, tracking_uri: Optional[str]) -> Path:
    if Path(ref).is_dir():
        return Path(ref)
    from tuneline.classify.registry import download_classifier
    from tuneline.paths import state_dir
    from tuneline.tracking import Tracker, default_tracking_uri

    return download_classifier(Tracker(tracking_uri or default_tracking_uri(state_dir())), ref)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from tuneline.classify.data import LabelError
    from tuneline.classify.evaluate import classify_file
    from tuneline.data.ingest import IngestError
    from tuneline.deploy.registry import RegistryError

    hf_logging.disable_progress_bar()  # stderr carries the one-line error, nothing else
    hf_logging.set_verbosity_error()
    try:
        if not Path(args.data).is_file():
            raise IngestError(f"{args.data}: no such file")
        result = classify_file(_model_dir(args.model, args.tracking_uri), args.data, samples=args.bootstrap,
                               delimiter=args.delimiter, text_column=args.text_column,
                               label_column=args.label_column)
    except (IngestError, LabelError, RegistryError, FileNotFoundError, ValueError) as exc:
        print(f"tuneline classify: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    ci = result["ci"]["macro_f1"]
    print(f"{args.data}: n {result['n']}, accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
          f"[{ci['low']:.4f}, {ci['high']:.4f}], ECE {result['ece']:.4f}")
    for label, row in sorted(result["per_class"].items(), key=lambda kv: kv[1]["f1"]):
        print(f"  {label:<40} F1 {row['f1']:.3f}  support {row['support']}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_standalone(argv, "classify", doc=__doc__, configure=_configure, run=run)


if __name__ == "__main__":
    sys.exit(main())
