"""``tuneline drift --reference PATH --current PATH``: have the current prompts drifted from the reference?

Both files may be in any format ``tuneline ingest`` reads; their prompt texts are compared with
:func:`tuneline.monitoring.drift.compute_drift` (MiniLM embeddings, MMD² permutation test, plus length,
out-of-vocabulary and script features). Exit status: 0 whether or not drift is found (read the report,
or ``drift`` in ``--json``), 2 with a one-line error on stderr that names the file for input that cannot
be read (or a bad option value). ``python -m tuneline.monitoring.cli_drift ...`` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from tuneline.cli import OptionError, add_subcommand, run_standalone, tokenizer_option
from tuneline.params import DriftParams


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``drift`` on the ``tuneline`` command's subparsers."""
    return add_subcommand(subparsers, "drift", help="test whether current prompts drifted from a reference", doc=__doc__, configure=_configure)


def _configure(parser: argparse.ArgumentParser) -> None:
    defaults = DriftParams()
    parser.add_argument("--reference", required=True, metavar="PATH", help="in-distribution data (e.g. training)")
    parser.add_argument("--current", required=True, metavar="PATH", help="data to test (e.g. recent requests)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="local tokenizer directory: adds token-length and out-of-vocabulary features")
    parser.add_argument("--significance", type=float, default=defaults.significance,
                        help="p-value below which the embedding test flags drift")
    parser.add_argument("--permutations", type=int, default=defaults.permutations,
                        help="permutations per test (at least 1/significance - 1)")
    parser.add_argument("--max-samples", type=int, default=defaults.max_samples,
                        help="texts per side; larger files are subsampled deterministically")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="subsampling and permutation seed")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tuneline.data.ingest import IngestError
    from tuneline.monitoring.drift import compute_drift, texts_from_file
    from tuneline.params import RecipeError

    try:
        params = DriftParams(significance=args.significance, permutations=args.permutations,
                             max_samples=args.max_samples, seed=args.seed)
        reference = texts_from_file(args.reference)
        current = texts_from_file(args.current)
        if len(reference) < 2 or len(current) < 2:
            short = args.reference if len(reference) < 2 else args.current
            raise OptionError(f"{short}: need at least 2 prompts to compare")
        tokenizer = tokenizer_option(args.tokenizer)
    except (IngestError, RecipeError, OptionError) as exc:
        print(f"tuneline drift: {exc}", file=sys.stderr)
        return 2
    report = compute_drift(reference, current, params, tokenizer=tokenizer)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print(_text_report(args.reference, args.current, report))
    return 0


def _text_report(reference: str, current: str, report) -> str:
    verdict = "DRIFT" if report.drift else "no drift"
    lines = [
        f"{current} vs {reference}: {verdict} "
        f"(embedding MMD² {report.score:.4g}, p={report.p_value:.4g}, significance {report.threshold:g}; "
        f"{report.n_current} vs {report.n_reference} prompts)",
    ]
    for name, feature in report.features.items():
        mark = "DRIFT" if feature["drift"] else "ok"
        lines.append(f"  {name:<14} {mark:<6} statistic {feature['statistic']:.4g} "
                     f"(threshold {feature['threshold']:g}), p={feature['p_value']:.4g} (alpha {feature['alpha']:.4g})")
    lines.extend(f"  reason: {reason}" for reason in report.reasons)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    return run_standalone(argv, "drift", doc=__doc__, configure=_configure, run=run)


if __name__ == "__main__":
    sys.exit(main())
