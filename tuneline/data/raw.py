"""The raw inputs of a run: the recipe's files (and the generated demo data), each with its sha256.

:func:`collect_inputs` is what ``raw_dataset`` calls. On a retrain it also claims the newly labelled files
dropped into the incoming folder: each is moved into ``consumed/<UTC date>/<run id>/`` under that folder
(so the next retrain does not learn from it again) and recorded at its new place, hash unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from tuneline import storage
from tuneline.params import DataSource, Recipe
from tuneline.paths import resolve, state_dir
from tuneline.records import sha256_file, sha256_text
from tuneline.refs import FileRef, RawDataRef

INCOMING_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
DEMO_ROLES = {"sft.jsonl": "sft", "preference.jsonl": "preference", "corpus.txt": "corpus", "drift.jsonl": "drift"}
CONSUMED_DIR = "consumed"


def incoming_dir(recipe: Recipe) -> Path:
    """Where newly labelled rows are dropped for retraining (``drift.incoming_dir``, default under the state)."""
    return Path(recipe.drift.incoming_dir) if recipe.drift.incoming_dir else state_dir() / "incoming"


def incoming_files(recipe: Recipe) -> list[Path]:
    """Newly labelled files waiting in the incoming folder (not yet claimed by a retrain)."""
    folder = incoming_dir(recipe)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in INCOMING_SUFFIXES)


def claim(files: Sequence[Path], recipe: Recipe, run_id: str) -> list[Path]:
    """Move ``files`` into ``consumed/<UTC date>/<run_id>/`` of the incoming folder; returns their new paths."""
    target = incoming_dir(recipe) / CONSUMED_DIR / time.strftime("%Y-%m-%d", time.gmtime()) / run_id
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in files:
        dest = target / path.name
        shutil.move(str(path), dest)
        moved.append(dest)
    return moved


def licence_of(path: Path) -> Optional[str]:
    """The licence a ``MANIFEST.json`` beside or above the file records for it (shared/data has one), if any."""
    for parent in list(path.resolve().parents)[:3]:
        manifest = parent / "MANIFEST.json"
        if not manifest.is_file():
            continue
        try:  # a damaged or hand-edited manifest records no licence; it never fails the run
            content = json.loads(manifest.read_text(encoding="utf-8"))
            rel = path.resolve().relative_to(parent).as_posix()
        except (OSError, ValueError, RecursionError):
            return None
        entries = content.get("files") if isinstance(content, dict) else None
        entry = next((e for e in entries if isinstance(e, dict) and e.get("file") == rel), None) \
            if isinstance(entries, list) else None
        sources = entry.get("sources") if entry is not None else None
        if not isinstance(sources, list):
            return None
        licences = [s["license"] for s in sources if isinstance(s, dict) and isinstance(s.get("license"), str)
                    and s["license"]]
        return "; ".join(dict.fromkeys(licences)) or None
    return None


def file_ref(path: Path, role: str, **how: object) -> FileRef:
    return FileRef(uri=storage.to_uri(path), sha256=sha256_file(path), bytes=path.stat().st_size, role=role,
                   licence=licence_of(path), **how)  # type: ignore[arg-type]


def collect_inputs(
    recipe: Recipe, demo_dir: Path, *, recipe_path: str, retrain: bool = False, run_id: str = "",
    claimed: Sequence[Path] = (),
) -> RawDataRef:
    """The run's input files, hashed: demo data (written under ``demo_dir``), the recipe's sources, claimed
    incoming files (a retrain) and corpus files. A missing file is an error naming it and the recipe."""
    from tuneline.data.demo import write_demo_data

    files: list[FileRef] = []
    manifest = None
    if recipe.data.demo is not None:
        manifest = write_demo_data(recipe.data.demo, demo_dir)
        files += [file_ref(demo_dir / name, role) for name, role in DEMO_ROLES.items()]
    for source in recipe.data.sources:
        path = resolve(source.path)
        if not path.is_file():
            raise FileNotFoundError(f"data.sources: {path} does not exist (recipe {recipe_path})")
        files.append(file_ref(path, "data", format=source.format, schema=source.schema, fields=dict(source.fields),
                              task=source.task, delimiter=source.delimiter, header=source.header,
                              columns=tuple(source.columns)))
    if retrain:
        files += [file_ref(path, "incoming") for path in claimed]
    for reference in (recipe.classifier.reference_corpus if recipe.classifier else ()):
        path = resolve(reference)
        if not path.is_file():
            raise FileNotFoundError(f"classifier.reference_corpus: {path} does not exist (recipe {recipe_path})")
        files.append(file_ref(path, "reference"))  # strategy auto: the domain the encoder knows
    for corpus in recipe.data.corpus:
        path = resolve(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"data.corpus: {path} does not exist (recipe {recipe_path})")
        files.append(file_ref(path, "corpus", format="txt", schema="text"))
    return RawDataRef(recipe=recipe.name, files=tuple(files), demo=manifest,
                      sha256=sha256_text("\n".join(f.sha256 for f in files)))


def check_sources(recipe: Recipe, *, recipe_path: str) -> None:
    """Read the recipe's data and corpus files once before a run starts, so that a missing file or one that
    cannot be read at all (empty, damaged, of no recognizable schema) stops the run with one line naming it,
    before any step has run (not a failed ``prepared_dataset`` after the base model was built). Rows the
    readers reject are not an error here: validation quarantines them."""
    from tuneline.data.ingest import read_source

    for key, source in [("data.sources", s) for s in recipe.data.sources] + [
            ("data.corpus", DataSource(path=c, format="txt", schema="text")) for c in recipe.data.corpus]:
        path = resolve(source.path)
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} does not exist (recipe {recipe_path})")
        read_source(dataclasses.replace(source, path=str(path)))


def stage_inputs(raw: RawDataRef, store_uri: str) -> RawDataRef:
    """The same inputs, copied into the artifact store when it is remote (``<store_uri>/<sha256>/<name>``), so
    trainers on other machines read them; a local store references the files where they are."""
    import dataclasses

    if storage.is_local(store_uri):
        return raw
    files = []
    for f in raw.files:
        uri = storage.join(store_uri, f.sha256, storage.basename(f.uri))
        if not storage.exists(uri):
            storage.publish(storage.fetch(f.uri), uri)
        files.append(dataclasses.replace(f, uri=uri))
    return dataclasses.replace(raw, files=tuple(files))
