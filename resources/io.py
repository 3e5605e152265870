"""The IO manager: typed stage references stored as JSON next to the artifacts they point at.

Each asset's value (a :class:`tuneline.refs.Ref`) is written to ``<root>/<asset>/<run id>.json`` and to
``<root>/<asset>/latest.json``. A downstream step of the same run reads its own run's value (two runs at
once never read each other's); a step that loads an asset materialized by an earlier run reads
``latest.json``. The stored JSON names its type, and a step that expects another type fails with a
message saying which.
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg
from pydantic import Field

from tuneline import refs, specs, storage

TYPES: dict[str, type] = {
    cls.__name__: cls
    for module in (refs, specs)
    for cls in vars(module).values()
    if isinstance(cls, type) and issubclass(cls, refs.Ref) and cls is not refs.Ref
}


class RefIOManager(dg.ConfigurableIOManager):
    """Stores :class:`tuneline.refs.Ref` values as JSON under a URI (local folder or object store)."""

    root: str = Field(description="Root URI (file:///... or s3://...) for the stored references.")

    def _uri(self, asset_key: dg.AssetKey, name: str) -> str:
        return storage.join(self.root, *asset_key.path, f"{name}.json")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if not isinstance(obj, refs.Ref):
            raise TypeError(f"{context.asset_key.to_user_string()} returned a {type(obj).__name__}: "
                            "assets hand on typed references (tuneline.refs)")
        text = json.dumps({"type": type(obj).__name__, "value": obj.to_dict()}, indent=2, sort_keys=True)
        storage.write_text(self._uri(context.asset_key, context.run_id), text + "\n")
        storage.write_text(self._uri(context.asset_key, "latest"), text + "\n")

    def load_input(self, context: dg.InputContext) -> Any:
        key = context.asset_key
        upstream = context.upstream_output
        try:
            same_run = upstream is not None and upstream.run_id == context.step_context.run_id
        except dg.DagsterInvariantViolationError:  # no run id to compare
            same_run = False
        # an asset this run did not materialize (``tuneline run --select``) comes with a stand-in run id
        # (Dagster 1.13: "__EPHEMERAL_RUN_ID"), not an error: only this run's own id selects its file
        uri = self._uri(key, upstream.run_id if same_run else "latest")
        if not storage.exists(uri):
            raise dg.Failure(f"{key.to_user_string()} has no stored value at {storage.redact(uri)}: "
                             "materialize it first")
        stored = json.loads(storage.read_text(uri))
        cls = TYPES.get(stored.get("type", ""))
        if cls is None:
            raise dg.Failure(f"{storage.redact(uri)} holds an unknown reference type {stored.get('type')!r}")
        expected = getattr(context.dagster_type, "typing_type", None)
        if isinstance(expected, type) and issubclass(expected, refs.Ref) and not issubclass(cls, expected):
            raise dg.Failure(f"input {context.name!r} expects a {expected.__name__}, but "
                             f"{key.to_user_string()} holds a {cls.__name__}")
        return cls.from_dict(stored["value"])
