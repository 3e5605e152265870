"""The MLflow model registry: register a full-weights model directory, move aliases, load it back.

:func:`register_model` logs the directory (safetensors weights, tokenizer, ``chat_template.jinja``)
as an MLflow 3 *logged model* of the given run: an ``mlflow.pyfunc`` model that carries the directory
as its artifact ``model_dir``, explicit ``pip_requirements`` (no dependency inference, nothing
fetched) and a signature that declares ``max_new_tokens`` as a param. It then registers a new version
of the registered model, tags it (source run id, weights sha256, logged model id, the caller's tags),
sets its aliases and attaches the model passport to the run as ``passport.md``.

Aliases, not stages (stages are deprecated in MLflow 3): ``challenger`` for a candidate,
``champion`` for what is served. :func:`promote` moves ``champion`` and records the version it moved
from on the new champion (``tuneline.previous_champion``); :func:`rollback` follows that tag back.

:func:`load_registered` downloads a version's weights directory, checks its sha256 against the
version's tag and loads it with ``from_pretrained`` (local files, safetensors only, no remote code).

Everything goes through an explicit :class:`~tuneline.tracking.Tracker` (no global MLflow state);
mlflow, torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from tuneline.tracking import Tracker

TAG_SOURCE_RUN = "tuneline.source_run_id"
TAG_WEIGHTS = "tuneline.weights_sha256"
TAG_LOGGED_MODEL = "tuneline.logged_model_id"
TAG_PASSPORT = "tuneline.passport"
TAG_PREVIOUS_CHAMPION = "tuneline.previous_champion"
TAG_PROMOTED_AT = "tuneline.promoted_at"
TAG_ROLLED_BACK_AT = "tuneline.rolled_back_at"
TAG_LAST_ROLLBACK = "tuneline.last_rollback"  # on the registered model: "FROM -> TO"
TAG_BASE_WEIGHTS = "tuneline.base_weights_sha256"  # a by-reference version's base (also on the base's logged model)
TAG_BASE_MODEL = "tuneline.base_logged_model_id"

CHAMPION = "champion"
CHALLENGER = "challenger"
ARTIFACT_KEY = "model_dir"  # the pyfunc artifact holding the from_pretrained directory
PASSPORT_FILE = "passport.md"
BASE_REF_FILE = "base_ref.json"  # in a by-reference version's model_dir: the logged base its adapter sits on
SERVABLE_MARKER = "servable.json"  # written last into a by-reference version's merged/bundled cache

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# packages a loaded pyfunc needs; pinned to the versions installed here (no inference, no network)
_PIP_PACKAGES = ("mlflow", "cloudpickle", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy")


class RegistryError(LookupError):
    """A registry operation that cannot be done: unknown model, version or alias, nothing to roll back to."""


# ---------------------------------------------------------------------------
# references


def parse_model_ref(ref: str) -> tuple[str, Optional[str], Optional[int]]:
    """``NAME@ALIAS`` -> (name, alias, None); ``NAME/VERSION`` -> (name, None, version); ``NAME`` -> (name, None, None).

    A leading ``models:/`` is accepted. Raises ValueError for an empty name, alias or a version < 1.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError("model reference is empty; use NAME@ALIAS or NAME/VERSION")
    text = ref.strip()
    if text.startswith("models:/"):
        text = text[len("models:/") :]
    alias: Optional[str] = None
    version: Optional[int] = None
    if "@" in text:
        text, alias = text.rsplit("@", 1)
        if not alias or not _ALIAS_RE.match(alias):
            raise ValueError(f"bad alias in model reference {ref!r}: use letters, digits, '_' or '-'")
    elif "/" in text:
        head, tail = text.rsplit("/", 1)
        if not tail.isdigit() or int(tail) < 1:
            raise ValueError(f"bad version in model reference {ref!r}: NAME/VERSION needs a version >= 1")
        text, version = head, int(tail)
    if not text or not _NAME_RE.match(text):
        raise ValueError(f"bad model name in reference {ref!r}: use letters, digits, '-', '_' or '.'")
    return text, alias, version


def _version_dict(mv: Any, alias: Optional[str] = None) -> dict[str, Any]:
    return {
        "name": mv.name,
        "version": int(mv.version),
        "alias": alias,
        "aliases": sorted(getattr(mv, "aliases", None) or []),
        "run_id": mv.run_id,
        "model_id": getattr(mv, "model_id", None) or (mv.tags or {}).get(TAG_LOGGED_MODEL),
        "source": mv.source,
        "status": mv.status,
        "tags": dict(mv.tags or {}),
        "description": mv.description,
        "creation_timestamp": mv.creation_timestamp,
        "model_uri": f"models:/{mv.name}/{mv.version}",
        "weights_sha256": (mv.tags or {}).get(TAG_WEIGHTS),
    }


def _not_found(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower()


def _get_by_alias(client: Any, name: str, alias: str) -> Optional[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def _get_by_version(client: Any, name: str, version: int | str) -> Optional[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def get_version(tracker: Tracker, name: str, alias_or_version: int | str | None = None) -> dict[str, Any]:
    """One model version as a dict (name, version, alias, aliases, run_id, source, tags, model_uri, ...).

    ``alias_or_version``: an int or digit string is a version, another string an alias. When it is
    None, ``name`` may be a whole reference (``NAME@ALIAS``, ``NAME/VERSION``); a bare name means its
    newest version. Raises :class:`RegistryError` when the model, version or alias does not exist.
    """
    if alias_or_version is None:
        name, alias, version = parse_model_ref(name)
    elif not _NAME_RE.match(name or ""):
        raise ValueError(f"bad registered model name {name!r}: use letters, digits, '-', '_' or '.'")
    elif isinstance(alias_or_version, int) or str(alias_or_version).isdigit():
        alias, version = None, int(alias_or_version)
    else:
        alias, version = str(alias_or_version), None
    client = tracker.client()
    if alias is not None:
        mv = _get_by_alias(client, name, alias)
        if mv is None:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r}{_known(client, name)}")
        return _version_dict(mv, alias)
    if version is not None:
        mv = _get_by_version(client, name, version)
        if mv is None:
            raise RegistryError(f"registered model {name!r} has no version {version}{_known(client, name)}")
        return _version_dict(mv)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise RegistryError(f"registered model {name!r} has no versions (is it registered?)")
    newest = max(versions, key=lambda v: int(v.version))
    return _version_dict(client.get_model_version(name, newest.version))


def current_champion(tracker: Tracker, name: str) -> Optional[dict[str, Any]]:
    """The version holding ``champion`` (as :func:`get_version` gives it), or None when there is none."""
    try:
        return get_version(tracker, name, CHAMPION)
    except RegistryError:
        return None


def _known(client: Any, name: str) -> str:
    """A hint listing what exists, for error messages."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return " (no such registered model)"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = dict(sorted((getattr(model, "aliases", None) or {}).items()))
    return f" (versions: {versions or 'none'}; aliases: {aliases or 'none'})"


# ---------------------------------------------------------------------------
# aliases, promotion, rollback


def set_alias(tracker: Tracker, name: str, alias: str, version: int | str) -> dict[str, Any]:
    """Point ``alias`` at ``version`` (which must exist); returns that version."""
    if not _ALIAS_RE.match(alias or "") or alias.isdigit():
        raise ValueError(f"bad alias {alias!r}: letters, digits, '_' or '-', not a bare number")
    client = tracker.client()
    if _get_by_version(client, name, version) is None:
        raise RegistryError(f"registered model {name!r} has no version {version}{_known(client, name)}")
    client.set_registered_model_alias(name, alias, str(version))
    return get_version(tracker, name, alias)


class ChampionMoved(RegistryError):
    """The champion changed between the gate's comparison and the promotion: the decision is stale."""


_UNCHECKED = object()


def promote(tracker: Tracker, name: str, version: int | str, *, alias: str = CHAMPION,
            expected: Any = _UNCHECKED) -> dict[str, Any]:
    """Move ``alias`` (``champion``) to ``version``; the version it leaves is tagged on the new one.

    With ``expected`` (the champion version the gate compared against, or None for "there was none") this is
    a compare-and-set: when the alias no longer points there, :class:`ChampionMoved` is raised and nothing
    changes, so a concurrent run's newer champion is never overwritten by a decision made against an older
    one. Returns ``{name, alias, version, previous_version, changed}``; promoting the current champion again
    changes nothing.
    """
    client = tracker.client()
    target = _get_by_version(client, name, version)
    if target is None:
        raise RegistryError(f"cannot promote: registered model {name!r} has no version {version}{_known(client, name)}")
    current = _get_by_alias(client, name, alias)
    previous = int(current.version) if current is not None else None
    if expected is not _UNCHECKED and previous != expected:
        raise ChampionMoved(f"{name}@{alias} is version {previous}, not the version {expected} the gate compared "
                            f"version {version} against: not promoted (evaluate it against the new champion)")
    if previous == int(version):
        return {"name": name, "alias": alias, "version": int(version), "previous_version": previous, "changed": False}
    if previous is not None:
        client.set_model_version_tag(name, str(version), TAG_PREVIOUS_CHAMPION, str(previous))
    else:
        # a stale tag from an earlier promotion must not send a later rollback somewhere unexpected
        if TAG_PREVIOUS_CHAMPION in (target.tags or {}):
            client.delete_model_version_tag(name, str(version), TAG_PREVIOUS_CHAMPION)
    client.set_model_version_tag(name, str(version), TAG_PROMOTED_AT, _now())
    client.set_registered_model_alias(name, alias, str(version))
    return {"name": name, "alias": alias, "version": int(version), "previous_version": previous, "changed": True}


def rollback(tracker: Tracker, name: str, *, alias: str = CHAMPION) -> dict[str, Any]:
    """Move ``alias`` (``champion``) back to the version it held before the current one.

    The previous version comes from the current champion's ``tuneline.previous_champion`` tag
    (written by :func:`promote`). Returns ``{name, alias, from_version, to_version}``. Raises
    :class:`RegistryError` when there is no champion, no previous one, or that version is gone.
    """
    client = tracker.client()
    current = _get_by_alias(client, name, alias)
    if current is None:
        raise RegistryError(f"cannot roll back {name!r}: no version holds the alias {alias!r}{_known(client, name)}")
    previous = (current.tags or {}).get(TAG_PREVIOUS_CHAMPION)
    if not previous:
        raise RegistryError(
            f"cannot roll back {name!r}: {alias} version {current.version} has no previous {alias} "
            f"(no {TAG_PREVIOUS_CHAMPION!r} tag: it was the first {alias}, or was itself restored by a rollback)"
        )
    if _get_by_version(client, name, previous) is None:
        raise RegistryError(f"cannot roll back {name!r}: previous {alias} version {previous} no longer exists")
    client.set_registered_model_alias(name, alias, str(previous))
    client.set_model_version_tag(name, current.version, TAG_ROLLED_BACK_AT, _now())
    client.set_registered_model_tag(name, TAG_LAST_ROLLBACK, f"{current.version} -> {previous}")
    return {"name": name, "alias": alias, "from_version": int(current.version), "to_version": int(previous)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------
# the pyfunc model (generation: tuneline.models.generation)


def _rows_from_input(model_input: Any) -> list[list[dict[str, str]]]:
    """Conversations from what ``pyfunc.predict`` gets: a DataFrame with ``prompt`` and/or ``messages``
    columns, a list of prompts, one prompt, a dict, or a list of such dicts."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if not {"prompt", "messages"} & set(map(str, model_input.columns)):
            raise ValueError(
                "input needs a 'prompt' or 'messages' column (pass a DataFrame or a list of dicts; a plain "
                "list of strings loses its column name under the model's signature)"
            )
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, str):
        records = [{"prompt": model_input}]
    elif isinstance(model_input, Mapping):
        records = [dict(model_input)]
    else:
        records = [{"prompt": r} if isinstance(r, str) else dict(r) for r in model_input]
    conversations = []
    for i, rec in enumerate(records):
        messages = rec.get("messages")
        prompt = rec.get("prompt")
        has_messages = messages is not None and not (isinstance(messages, float) and messages != messages)
        has_prompt = isinstance(prompt, str) and prompt != ""
        if has_messages == has_prompt:
            raise ValueError(f"row {i}: give exactly one of 'prompt' and 'messages'")
        if has_prompt:
            conversations.append([{"role": "user", "content": prompt}])
        else:
            if isinstance(messages, str):
                messages = json.loads(messages)
            conversations.append([{"role": str(m["role"]), "content": str(m["content"])} for m in messages])
    return conversations


def _pyfunc_model() -> Any:
    """An ``mlflow.pyfunc.PythonModel`` around a ``from_pretrained`` directory.

    The class is built here (not at import) so mlflow stays a lazy import; it is pickled by value
    (see :func:`register_model`), so loading it needs mlflow, torch and transformers, not tuneline.
    """
    import mlflow.pyfunc

    class TunelineChatModel(mlflow.pyfunc.PythonModel):
        """Greedy chat generation; input rows hold ``prompt`` (str) or ``messages`` ([{role, content}]).

        One batch holds one kind: MLflow's schema check refuses a missing (NaN) ``messages`` cell.
        """

        # no type hints on these two methods: MLflow would try to derive a signature from them
        def load_context(self, context):
            from tuneline.models.loading import load_causal_lm, load_tokenizer

            path = context.artifacts[ARTIFACT_KEY]  # a bundle with bottleneck adapters loads them too
            if (Path(path) / BASE_REF_FILE).is_file():  # an adapter registered by reference: fetch its base
                import os

                path = servable_from_reference(Path(path), Path(path).parent / "servable",
                                               Path(path).parent / "_bases", os.environ.get("MLFLOW_TRACKING_URI"))
            self.tokenizer = load_tokenizer(path)
            self.model = load_causal_lm(path, device="auto")  # a GPU when the serving host has one

        def predict(self, context, model_input, params=None):
            max_new_tokens = int((params or {}).get("max_new_tokens") or 64)
            out = []
            for messages in _rows_from_input(model_input):
                from tuneline.models.generation import chat_generate

                result = chat_generate(self.model, self.tokenizer, messages, max_new_tokens=max_new_tokens)
                out.append({k: result[k] for k in ("text", "new_tokens", "finish_reason", "prompt_tokens")})
            return out

    return TunelineChatModel()


def _signature(default_max_new_tokens: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema([ColSpec("string", "prompt", required=False), ColSpec(Array(message), "messages", required=False)])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", int(default_max_new_tokens))])
    return ModelSignature(inputs=inputs, params=params)


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged pyfunc model (the versions installed here, local labels dropped)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in _PIP_PACKAGES:
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


# ---------------------------------------------------------------------------
# registering


def check_model_dir(model_dir: str | Path) -> Path:
    """The directory, after checking it holds safetensors weights, a config, a tokenizer and no pickles."""
    return _checked_dir(model_dir, ("config.json",), "not a from_pretrained directory")


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The directory, after checking it holds an adapter (PEFT or bottleneck) in safetensors, a tokenizer and no
    pickles."""
    return _checked_dir(adapter_dir, ("adapter_config.json", "bottleneck_config.json"), "not an adapter")


def _checked_dir(directory: str | Path, configs: tuple[str, ...], what_else: str) -> Path:
    """``directory`` holds safetensors weights, no pickle-format file, one of ``configs`` and a tokenizer config."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    pickles = sorted(p.name for p in path.rglob("*") if p.suffix in _FORBIDDEN_SUFFIXES)
    if pickles:
        raise ValueError(f"{path} holds pickle-format files {pickles}: only safetensors are registered")
    if not any((path / name).is_file() for name in configs):
        raise FileNotFoundError(f"{path} has no {' or '.join(configs)}: {what_else}")
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer_config.json: {what_else}")
    return path


def log_base(client: Any, experiment_id: str, name: str, base_dir: Path, sha: str,
             tags: Optional[Mapping[str, str]] = None) -> Any:
    """The base's weights as a logged model of the experiment, logged once per content hash: every adapter
    version on the same base refers to this one copy."""
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models(experiment_ids=[experiment_id],
                                        filter_string=f"tags.`{TAG_BASE_WEIGHTS}` = '{sha}'")
    ready = [m for m in found if m.status == LoggedModelStatus.READY and m.tags.get(TAG_BASE_WEIGHTS) == sha]
    if ready:
        return ready[0]
    logged = client.create_logged_model(experiment_id=experiment_id, name=f"{name}-base", model_type="base-weights",
                                        tags={TAG_BASE_WEIGHTS: sha, **(tags or {})})
    try:
        client.log_model_artifacts(logged.model_id, str(base_dir))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return client.get_logged_model(logged.model_id)


def _model_root(tmp: Path, marker: str) -> Path:
    """The directory holding ``marker`` in a download: ``tmp`` itself or its one subfolder."""
    return tmp if (tmp / marker).is_file() else next(tmp.glob(f"*/{marker}"), tmp / marker).parent


def servable_from_reference(adapter_dir: Path, cache_dir: Path, bases_dir: Path, tracking_uri: Optional[str]) -> Path:
    """A from_pretrained directory for an adapter registered by reference: its base fetched from the logged
    model ``BASE_REF_FILE`` names (cached by sha256 and checked against it), the adapter merged (LoRA family)
    or bundled (bottleneck) onto it, in ``cache_dir``, reused while the adapter and base hashes match; bases are
    cached in ``bases_dir`` by sha256, one copy for every version on the same base."""
    import mlflow.artifacts

    from tuneline.deploy.bundle import adapter_on_base
    from tuneline.models.loading import weights_sha256

    ref = json.loads((adapter_dir / BASE_REF_FILE).read_text(encoding="utf-8"))
    stamp = {"adapter_sha256": weights_sha256(adapter_dir), "base_sha256": ref["weights_sha256"]}

    def ready() -> bool:
        marker = cache_dir / SERVABLE_MARKER
        return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp

    if ready():
        return cache_dir / "model"
    base = bases_dir / ref["weights_sha256"]
    if not (base.is_dir() and any(base.glob("*.safetensors")) and weights_sha256(base) == ref["weights_sha256"]):
        shutil.rmtree(base, ignore_errors=True)
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=base.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=ref["artifact_location"], dst_path=str(tmp),
                                                tracking_uri=tracking_uri)
            got = _model_root(tmp, "config.json")
            actual = weights_sha256(got)
            if actual != ref["weights_sha256"]:
                raise RegistryError(f"base {ref['logged_model_id']}: downloaded weights sha256 {actual} does not "
                                    f"match the reference {ref['weights_sha256']}")
            _publish_dir(got, base)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".servable-", dir=cache_dir.parent))
    try:  # built aside and renamed into place: a concurrent loader sees all of it or none
        made, _ = adapter_on_base(base, adapter_dir, work / "build", what=f"the adapter in {adapter_dir}")
        staged = work / "servable"
        staged.mkdir()
        made.rename(staged / "model")
        (staged / SERVABLE_MARKER).write_text(json.dumps(stamp), encoding="utf-8")
        if not ready():
            shutil.rmtree(cache_dir, ignore_errors=True)  # a stale copy (another adapter or base)
            _publish_dir(staged, cache_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cache_dir / "model"


def _publish_dir(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest``; when another process got there first, its copy stands."""
    try:
        src.rename(dest)
    except OSError:
        if not dest.is_dir():
            raise


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    try:
        client.create_registered_model(name, description="tuneline chat model (full weights, safetensors)")
    except MlflowException as exc:  # registered concurrently by someone else
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise


def register_model(
    tracker: Tracker,
    name: str,
    model_dir: str | Path,
    *,
    run_id: str,
    passport_md: Optional[str] = None,
    tags: Optional[Mapping[str, Any]] = None,
    aliases: Iterable[str] = (CHALLENGER,),
    default_max_new_tokens: int = 64,
    base_dir: str | Path | None = None,
    base_tags: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """Log ``model_dir`` as a pyfunc model of run ``run_id``, register it as a new version of ``name``.

    The version is tagged with the source run id, the weights sha256, the logged model id and
    ``tags``; ``aliases`` point at it; ``passport_md`` (when given) becomes the run's ``passport.md``.
    With ``base_dir``, ``model_dir`` is an adapter registered by reference: the base is logged once per
    content hash (:func:`log_base`, ``base_tags`` on it), the version holds the adapter and ``BASE_REF_FILE``,
    and is tagged with the base's sha256 and logged model id.
    Returns ``{name, version, run_id, model_uri, aliases, model_id, weights_sha256, source, base_weights_sha256}``.
    """
    import cloudpickle
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from tuneline.models.loading import weights_sha256

    if not _NAME_RE.match(name or ""):
        raise ValueError(f"bad registered model name {name!r}: use letters, digits, '-', '_' or '.'")
    aliases = list(aliases)
    for alias in aliases:
        if not _ALIAS_RE.match(alias) or alias.isdigit():
            raise ValueError(f"bad alias {alias!r}")
    path = check_adapter_dir(model_dir) if base_dir is not None else check_model_dir(model_dir)
    sha = weights_sha256(path)
    client = tracker.client()
    run = client.get_run(run_id)
    base_ref: Optional[dict[str, str]] = None
    if base_dir is not None:
        base_path = check_model_dir(base_dir)
        base_sha = weights_sha256(base_path)
        base = log_base(client, run.info.experiment_id, name, base_path, base_sha, base_tags)
        base_ref = {"logged_model_id": base.model_id, "artifact_location": base.artifact_location,
                    "weights_sha256": base_sha, **{k: str(v) for k, v in (base_tags or {}).items()}}

    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        tags={TAG_WEIGHTS: sha, "mlflow.loggedModel.flavor": "python_function"},
        model_type="chat-llm",
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        module = sys.modules[__name__]
        with tempfile.TemporaryDirectory(prefix="tuneline-pyfunc-") as tmp:
            local = Path(tmp) / "model"
            if base_ref is not None:  # the adapter's files and which base they sit on
                staged = Path(tmp) / "adapter"
                shutil.copytree(path, staged)
                (staged / BASE_REF_FILE).write_text(json.dumps(base_ref, indent=2), encoding="utf-8")
                path = staged
            mlflow_model = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            )
            cloudpickle.register_pickle_by_value(module)  # the model loads without tuneline installed
            try:
                mlflow.pyfunc.save_model(
                    path=str(local),
                    python_model=_pyfunc_model(),
                    artifacts={ARTIFACT_KEY: str(path.resolve())},
                    signature=_signature(default_max_new_tokens),
                    pip_requirements=pip_requirements(),
                    metadata={TAG_WEIGHTS: sha, "source_run_id": run_id, "base": base_ref},
                    mlflow_model=mlflow_model,
                )
            finally:
                cloudpickle.unregister_pickle_by_value(module)
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)

    if passport_md is not None:
        client.log_text(run_id, passport_md, PASSPORT_FILE)

    version_tags = {str(k): str(v) for k, v in (tags or {}).items() if v is not None}
    version_tags.update(
        {
            TAG_SOURCE_RUN: run_id,
            TAG_WEIGHTS: sha,
            TAG_LOGGED_MODEL: logged.model_id,
        }
    )
    if base_ref is not None:
        version_tags.update({TAG_BASE_WEIGHTS: base_ref["weights_sha256"], TAG_BASE_MODEL: base_ref["logged_model_id"]})
    if passport_md is not None:
        version_tags[TAG_PASSPORT] = f"runs:/{run_id}/{PASSPORT_FILE}"
    _ensure_registered_model(client, name)
    mv = client.create_model_version(
        name=name,
        source=logged.artifact_location,
        run_id=run_id,
        tags=version_tags,
        model_id=logged.model_id,
    )
    version = int(mv.version)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, str(version))
    return {
        "name": name,
        "version": version,
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version}",
        "aliases": aliases,
        "model_id": logged.model_id,
        "weights_sha256": sha,
        "source": mv.source,
        "base_weights_sha256": base_ref["weights_sha256"] if base_ref else None,
    }


# ---------------------------------------------------------------------------
# loading


def _pyfunc_artifact_dir(model_root: Path) -> Path:
    """Where the pyfunc model keeps the ``model_dir`` artifact (read from its MLmodel file)."""
    import yaml

    mlmodel = yaml.safe_load((model_root / "MLmodel").read_text(encoding="utf-8"))
    artifacts = (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}
    entry = artifacts.get(ARTIFACT_KEY)
    if not entry:
        raise RegistryError(f"{model_root}/MLmodel has no {ARTIFACT_KEY!r} artifact: not a tuneline model")
    rel = entry["path"] if isinstance(entry, Mapping) else str(entry)
    return model_root / rel


def download_version(tracker: Tracker, info: Mapping[str, Any], cache_dir: str | Path | None = None) -> Path:
    """The version's ``from_pretrained`` directory on local disk, downloaded once and checked.

    Cached under ``cache_dir`` (default ``$TUNELINE_HOME/registry``)/NAME/VERSION; a cached copy is
    reused only when its weights still match the version's sha256 tag. A version registered by reference
    (an adapter and ``BASE_REF_FILE``) returns the adapter merged or bundled onto its base, the base fetched
    once per sha256 into ``cache_dir/_bases`` and checked against the reference.
    """
    import mlflow.artifacts

    from tuneline.models.loading import weights_sha256
    from tuneline.paths import state_dir

    expected = info.get("weights_sha256")
    root = Path(cache_dir) if cache_dir is not None else state_dir() / "registry"
    dest = root / info["name"] / str(info["version"])
    if (dest / "MLmodel").is_file():
        model_path = _pyfunc_artifact_dir(dest)
        if expected and model_path.is_dir() and any(model_path.glob("*.safetensors")):
            if weights_sha256(model_path) == expected:
                return _servable(tracker, dest, model_path)
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info['version']}-", dir=dest.parent))
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=info["source"], dst_path=str(tmp), tracking_uri=tracker.tracking_uri
        )
        got = _model_root(tmp, "MLmodel")
        model_path = _pyfunc_artifact_dir(got)
        actual = weights_sha256(model_path)
        if expected and actual != expected:
            raise RegistryError(
                f"{info['name']} version {info['version']}: downloaded weights sha256 {actual} does not match "
                f"the version's tag {expected}"
            )
        try:
            got.rename(dest)
        except OSError:  # another process cached it first
            if not (dest / "MLmodel").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _servable(tracker, dest, _pyfunc_artifact_dir(dest))


def _servable(tracker: Tracker, dest: Path, model_path: Path) -> Path:
    """The version's from_pretrained directory: ``model_path`` itself, or for an adapter registered by reference
    the adapter on its fetched base (in ``dest/servable``)."""
    if not (model_path / BASE_REF_FILE).is_file():
        return model_path
    return servable_from_reference(model_path, dest / "servable", dest.parent.parent / "_bases", tracker.tracking_uri)


def load_registered(
    tracker: Tracker,
    ref: str,
    *,
    cache_dir: str | Path | None = None,
    dtype: Any = None,
    offload: Any = None,
    device: Optional[str] = "auto",
) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info) for ``NAME@ALIAS`` or ``NAME/VERSION`` (a bare NAME: newest version).

    The weights are downloaded (see :func:`download_version`), checked against the version's sha256
    and loaded with ``from_pretrained`` from local files only (safetensors, no remote code). ``info``
    is :func:`get_version`'s dict plus ``path`` (the local directory).
    """
    from tuneline.models.loading import load_causal_lm, load_tokenizer

    info = get_version(tracker, ref)
    path = download_version(tracker, info, cache_dir)
    tokenizer = load_tokenizer(path)  # a local directory: nothing is fetched
    model = load_causal_lm(path, dtype=dtype, offload=offload, device=device)
    info = dict(info, path=str(path))
    return model, tokenizer, info
