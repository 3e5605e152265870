"""Where stage files live: URIs (``file://``, ``s3://``, ``gs://``, ...) read and written through fsspec.

Stages hand each other URIs, never paths on one machine, so a trainer in another process, on another
machine or in a Kubernetes pod can read its inputs and write its outputs. Local files are ``file:///abs``
URIs; a remote URI is fetched into a local cache before use (:func:`fetch`) and a stage that writes to
a remote URI works in a local folder that is uploaded (:class:`Workspace`).

Credentials never appear in a URI we store or log: object stores take them from the environment (for S3
the usual ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``; an S3-compatible endpoint from
``TUNELINE_S3_ENDPOINT_URL``), and :func:`redact` masks a ``user:password@`` in any URL-like text before it
is logged.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

LOCAL_SCHEMES = ("", "file")
COMPLETE_MARKER = ".tuneline-fetched"  # written into a cached remote directory once it is whole
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]+)@")


class StorageError(OSError):
    """A URI that cannot be read or written; the message names the (redacted) URI."""


def redact(text: Any) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` replaced by ``***``."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", str(text))


def to_uri(location: str | Path) -> str:
    """A URI for a local path (made absolute: ``file:///abs/path``) or a URI (returned as it is)."""
    text = str(location)
    if scheme(text) not in LOCAL_SCHEMES:
        return text
    if text.startswith("file://"):
        return text
    return Path(text).expanduser().resolve().as_uri()


def scheme(uri: str | Path) -> str:
    text = str(uri)
    if re.match(r"^[A-Za-z]:[\\/]", text):  # a Windows drive letter is not a scheme
        return ""
    return urlparse(text).scheme if "://" in text else ""


def is_local(uri: str | Path) -> bool:
    return scheme(uri) in LOCAL_SCHEMES


def local_path(uri: str | Path) -> Path:
    """The path of a local URI (``file:///x`` or a plain path); a remote URI is an error (use :func:`fetch`)."""
    text = str(uri)
    if not is_local(text):
        raise StorageError(f"{redact(text)} is not on this machine: fetch it first")
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    return Path(text).expanduser()


def join(uri: str, *parts: str) -> str:
    """``uri`` with path parts appended (``/``-separated for every scheme)."""
    out = str(uri).rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` from the environment (never from the URI, never logged)."""
    if scheme(uri) in ("s3", "s3a"):
        endpoint = os.environ.get("TUNELINE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for ``uri``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(uri), **storage_options(str(uri)))
    return fs, path


def exists(uri: str) -> bool:
    if is_local(uri):
        return local_path(uri).exists()
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def read_bytes(uri: str) -> bytes:
    try:
        if is_local(uri):
            return local_path(uri).read_bytes()
        fs, path = filesystem(uri)
        return fs.cat_file(path)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read {redact(uri)}: {exc}") from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to ``uri`` (atomically for a local file: temp file + rename)."""
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return
    fs, path = filesystem(uri)
    with fs.open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def cache_root() -> Path:
    """Where remote URIs are fetched to: ``$TUNELINE_CACHE`` or ``$TUNELINE_HOME/cache``."""
    from tuneline.paths import state_dir

    return Path(os.environ.get("TUNELINE_CACHE") or state_dir() / "cache")


def fetch(uri: str, cache: Optional[str | Path] = None) -> Path:
    """A local path holding ``uri`` (a file or a folder): the path itself for a local URI, else a cached copy.

    A remote folder is downloaded whole and marked complete; a cached copy is reused only when marked
    (an interrupted download is fetched again). Stage outputs are written once under a run-specific URI,
    so a complete copy never goes stale.
    """
    if is_local(uri):
        path = local_path(uri)
        if not path.exists():
            raise StorageError(f"{redact(uri)} does not exist")
        return path
    root = Path(cache) if cache is not None else cache_root()
    key = hashlib.sha256(str(uri).encode()).hexdigest()[:24]
    dest = root / key / (basename(uri) or "object")
    marker = root / key / COMPLETE_MARKER
    if marker.is_file() and dest.exists():
        return dest
    fs, path = filesystem(uri)
    try:
        if not fs.exists(path):
            raise StorageError(f"{redact(uri)} does not exist")
        shutil.rmtree(root / key, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
            dest.mkdir(exist_ok=True)  # an empty remote folder
        else:
            fs.get(path, str(dest))
    except StorageError:
        raise
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot fetch {redact(uri)}: {exc}") from exc
    marker.write_text(str(uri), encoding="utf-8")
    return dest


def publish(local: str | Path, uri: str) -> str:
    """Copy a local file or folder to ``uri`` (upload for a remote URI); returns ``uri``.

    Publishing a local path onto itself does nothing.
    """
    src = Path(local)
    if not src.exists():
        raise StorageError(f"cannot publish {src}: it does not exist")
    if is_local(uri):
        dest = local_path(uri)
        if dest.resolve() == src.resolve():
            return uri
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        return uri
    fs, path = filesystem(uri)
    try:
        if src.is_dir():
            fs.put(str(src).rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
        else:
            fs.put(str(src), path)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot publish {src} to {redact(uri)}: {exc}") from exc
    return uri


class Workspace:
    """A local folder for a stage whose output URI may be remote.

    For a local ``out_uri`` the folder is that path. For a remote one it is a scratch folder under the cache,
    first filled with what the URI already holds (so a retried trainer resumes from its uploaded
    checkpoints); :meth:`sync` uploads it (or one subfolder) back.
    """

    def __init__(self, out_uri: str, scratch: Optional[str | Path] = None) -> None:
        self.uri = to_uri(out_uri)
        if is_local(self.uri):
            self.path = local_path(self.uri)
            self.path.mkdir(parents=True, exist_ok=True)
            self.remote = False
            return
        self.remote = True
        root = Path(scratch) if scratch is not None else cache_root() / "work"
        self.path = root / hashlib.sha256(self.uri.encode()).hexdigest()[:24]
        self.path.mkdir(parents=True, exist_ok=True)
        fs, path = filesystem(self.uri)
        if fs.exists(path):
            fs.get(path.rstrip("/") + "/", str(self.path), recursive=True)

    def uri_of(self, relative: str | Path = "") -> str:
        """The URI of a path inside the workspace."""
        rel = Path(relative)
        if rel.is_absolute():
            rel = rel.relative_to(self.path)
        return join(self.uri, rel.as_posix()) if str(rel) not in ("", ".") else self.uri

    def sync(self, relative: str | Path = "") -> None:
        """Upload the workspace (or the file/folder ``relative`` inside it) to its URI (local: nothing to do)."""
        if not self.remote:
            return
        local = self.path / relative
        publish(local, self.uri_of(relative))
