"""Crash-safe checkpoints: a completion marker written last (with the sha256 of every file), the newest intact
checkpoint found on resume, and a full disk explained; folders shared between processes (caches) moved into place
only once complete. Light: no torch or transformers import."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"  # written last (atomic rename) into a fully written checkpoint
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str | Path) -> int:
    """The global step of a ``checkpoint-N`` directory."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-N directory")
    return int(match.group(1))


def temp_sibling(target: str | Path) -> Path:
    """An empty-to-be folder beside ``target``, private to this process, to write ``target``'s content into before
    :func:`move_into_place` (a leftover of an earlier attempt of this process id is removed)."""
    target = Path(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def move_into_place(tmp: str | Path, target: str | Path, complete: str) -> None:
    """Rename the finished folder ``tmp`` to ``target``, so no reader ever sees half of it. When another process
    put a complete ``target`` there first (``target/complete`` present: same inputs, same content) theirs stays and
    ``tmp`` goes; an incomplete ``target`` (an interrupted write) is replaced."""
    tmp, target = Path(tmp), Path(target)
    if (target / complete).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process renamed its complete folder in between
        if not (target / complete).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def mark_complete(checkpoint_dir: str | Path, step: int) -> Path:
    """Write the completion marker into ``checkpoint_dir`` (the step and the sha256 of every file, so a
    checkpoint damaged later is recognized): temp file, fsync, then atomic rename."""
    from tuneline.records import sha256_file

    folder = Path(checkpoint_dir)
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith(f".{COMPLETE_MARKER}")}
    tmp = folder / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, "files": files}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    final = folder / COMPLETE_MARKER
    os.replace(tmp, final)
    return final


MIN_FREE_BYTES = 1 << 20  # below this much free space a failed write is taken for a full disk


@contextmanager
def disk_full_explained(checkpoints_dir: str | Path) -> Iterator[None]:
    """Re-raise a write that failed because the disk holding ``checkpoints_dir`` is full (torch reports it as
    an obscure ``RuntimeError: ... unexpected pos``) as an ``OSError(ENOSPC)`` that says so, and which complete
    checkpoint a rerun will resume from; other errors pass through unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        folder = Path(checkpoints_dir)
        probe = folder if folder.exists() else folder.parent
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free >= MIN_FREE_BYTES and getattr(exc, "errno", None) != errno.ENOSPC:
            raise
        previous = last_valid_checkpoint(folder, delete_incomplete=False)
        raise OSError(errno.ENOSPC, f"No space left on device: the disk holding {folder} has {free} bytes free; "
                      f"the checkpoint being written is incomplete and will be ignored; a rerun resumes from "
                      f"{previous.name if previous else 'the start (no complete checkpoint yet)'} once there is "
                      "room") from exc


def checkpoint_is_intact(folder: str | Path) -> bool:
    """True when every file the completion marker lists is there with its sha256 (a marker from before files
    were listed only vouches for completion)."""
    from tuneline.records import sha256_file

    folder = Path(folder)
    try:
        manifest = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return isinstance(manifest, int)  # the old marker: just the step
    for name, sha in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != sha:
            return False
    return True


def last_valid_checkpoint(checkpoints_dir: str | Path, *, delete_incomplete: bool = True) -> Optional[Path]:
    """The highest-step ``checkpoint-N`` that is complete and intact, or None.

    Checkpoints without the marker (a save cut off by a crash, a kill or a full disk) are never returned;
    with ``delete_incomplete`` they are removed so the trainer's rotation cannot count them either. A complete
    checkpoint whose files no longer match their recorded sha256 (damaged on disk) is skipped, and the one
    before it is used.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    complete = []
    for child in root.iterdir():
        if not child.is_dir() or not _CHECKPOINT_RE.match(child.name):
            continue
        if (child / COMPLETE_MARKER).is_file():
            complete.append(child)
        elif delete_incomplete:
            shutil.rmtree(child, ignore_errors=True)
    for child in sorted(complete, key=checkpoint_step, reverse=True):
        if checkpoint_is_intact(child):
            return child
    return None
