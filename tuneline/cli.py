"""What the ``tuneline`` subcommands that live in ``tuneline/`` share: registered on the ``tuneline`` command's
subparsers, or run on their own (``python -m tuneline.data.cli_ingest ...``), with the same options either way."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


def add_subcommand(subparsers: Any, name: str, *, help: str, doc: Optional[str], configure: Configure) -> Any:  # noqa: A002
    """Register ``name`` (its options from ``configure``, ``doc`` as its description) on ``subparsers``."""
    parser = subparsers.add_parser(name, help=help, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return parser


def run_standalone(argv: Optional[list[str]], name: str, *, doc: Optional[str], configure: Configure, run: Run) -> int:
    """Parse ``argv`` with the subcommand's options and run it: what ``python -m <module>`` does."""
    parser = argparse.ArgumentParser(prog=f"tuneline {name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


class OptionError(ValueError):
    """An option value the command cannot use (exit status 2, the message names the value)."""


def tokenizer_option(path: Optional[str]) -> Any:
    """The tokenizer a ``--tokenizer PATH`` option names (None without one), or :class:`OptionError` saying why."""
    if not path:
        return None
    from tuneline.models.loading import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for an unusable directory
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OptionError(f"{path}: cannot load tokenizer ({message})") from None
