"""Artifacts (reports, certificates, exports): bytes stored once per sha256, behind one small
interface. A processor writes them (`put`), the read-only API serves them (`info`, `get`), so
the interface lives in the kernel.

    store.put(name, content_type, data) -> Artifact(id, sha256, size, location, ...)
    store.get(sha256) -> bytes          (ArtifactNotFound; ArtifactCorrupt if the bytes read
                                         back do not hash to their address)
    store.info(sha256) -> Artifact | None

Content-addressed: an artifact's id is the sha256 of its bytes (hex). Putting the same bytes
again (a regenerated report, a redelivered event handled twice, two workers at once) stores
nothing new and returns the artifact already stored, with the name and content type of its
first put.

Two implementations:

- `GridFSStore`: pymongo's GridFS in the Mongo store (bucket `artifacts` of the database),
  the file's `_id` being its sha256, so a second copy cannot be stored (the `_id` and the chunks'
  unique (files_id, n) index refuse it). Checked against the development server SecantusDB
  0.7.0b3 (upload, download by id, the bucket's indexes including the unique chunk index,
  duplicate _id refused with FileExists): it works there as on MongoDB.
- `FileStore`: a directory, `<root>/<sha[:2]>/<sha[2:4]>/<sha>` and a `<sha>.json` beside it
  (name, content type); written to a temporary file and renamed into place, so a reader never
  sees half a file.

A put that finds another writer's upload of the same bytes under way waits for it to finish;
one whose writer died midway (its chunks without a files document) is cleaned up and redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class ArtifactNotFound(LookupError):
    """No artifact with that sha256 in the store."""


class ArtifactCorrupt(RuntimeError):
    """The stored bytes do not hash to the sha256 they are stored under."""


@dataclass(frozen=True)
class Artifact:
    id: str  # the sha256 (content-addressed)
    sha256: str
    size: int
    location: str  # where the store keeps it: gridfs://<db>/<bucket>/<sha256>, file:///...
    name: str = ""
    content_type: str = DEFAULT_CONTENT_TYPE

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sha256": self.sha256, "size": self.size,
                "location": self.location, "name": self.name,
                "content_type": self.content_type}


class ArtifactStore(Protocol):
    def put(self, name: str, content_type: str, data: bytes) -> Artifact: ...

    def get(self, sha256: str) -> bytes: ...

    def info(self, sha256: str) -> Artifact | None: ...


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checked_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not SHA256.match(sha256):
        raise ValueError(f"not a sha256 (64 lowercase hex digits): {sha256!r}")
    return sha256


def _checked_put(name: str, content_type: str, data: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"artifact data must be bytes, not {type(data).__name__}")
    if not isinstance(name, str) or not isinstance(content_type, str):
        raise TypeError("name and content_type must be strings")
    return bytes(data)


def _verified(sha256: str, data: bytes, where: str) -> bytes:
    got = sha256_of(data)
    if got != sha256:
        raise ArtifactCorrupt(f"{where}: the stored bytes hash to {got}, not {sha256}")
    return data


# -- GridFS -------------------------------------------------------------------------------------

class GridFSStore:
    """Artifacts in a GridFS bucket of a pymongo `Database` (sync client)."""

    def __init__(self, database: Any, bucket: str = "artifacts",
                 writer_wait_s: float = 10.0) -> None:
        import gridfs

        self.db = database
        self.bucket_name = bucket
        self.bucket = gridfs.GridFSBucket(database, bucket_name=bucket)
        self.files = database[f"{bucket}.files"]
        self.chunks = database[f"{bucket}.chunks"]
        self.writer_wait_s = writer_wait_s

    def _location(self, sha256: str) -> str:
        return f"gridfs://{self.db.name}/{self.bucket_name}/{sha256}"

    def _artifact(self, doc: dict[str, Any]) -> Artifact:
        meta = doc.get("metadata") or {}
        return Artifact(id=doc["_id"], sha256=doc["_id"], size=int(doc["length"]),
                        location=self._location(doc["_id"]), name=doc.get("filename") or "",
                        content_type=meta.get("content_type") or DEFAULT_CONTENT_TYPE)

    def info(self, sha256: str) -> Artifact | None:
        doc = self.files.find_one({"_id": _checked_sha(sha256)})
        return None if doc is None else self._artifact(doc)

    def put(self, name: str, content_type: str, data: bytes) -> Artifact:
        import gridfs.errors
        from pymongo.errors import DuplicateKeyError

        data = _checked_put(name, content_type, data)
        sha = sha256_of(data)
        for _ in range(3):
            known = self.info(sha)
            if known is not None:
                return self._same_size(known, len(data))
            try:
                self.bucket.upload_from_stream_with_id(
                    sha, name, data, metadata={"content_type": content_type, "sha256": sha})
                return Artifact(sha, sha, len(data), self._location(sha), name, content_type)
            except (gridfs.errors.FileExists, DuplicateKeyError):
                pass  # another writer has (or had) an upload of these bytes under way
            known = self._wait_for_files_document(sha)
            if known is not None:
                return self._same_size(known, len(data))
            # its writer died between its chunks and its files document: clean up, redo
            self.chunks.delete_many({"files_id": sha})
        raise RuntimeError(f"artifact {sha}: could not be stored (an upload of the same bytes "
                           "kept conflicting)")

    def _wait_for_files_document(self, sha: str) -> Artifact | None:
        deadline = time.monotonic() + self.writer_wait_s
        while True:
            known = self.info(sha)
            if known is not None or time.monotonic() >= deadline:
                return known
            time.sleep(0.05)

    def _same_size(self, known: Artifact, size: int) -> Artifact:
        if known.size != size:
            raise ArtifactCorrupt(f"{known.location}: stored with {known.size} bytes, but "
                                  f"these bytes of the same sha256 are {size}")
        return known

    def get(self, sha256: str) -> bytes:
        import gridfs.errors

        sha = _checked_sha(sha256)
        try:
            with self.bucket.open_download_stream(sha) as stream:
                data = stream.read()
        except gridfs.errors.NoFile:
            raise ArtifactNotFound(f"no artifact {sha} in {self._location(sha)}") from None
        except gridfs.errors.CorruptGridFile as e:
            raise ArtifactCorrupt(f"{self._location(sha)}: {e}") from None
        return _verified(sha, data, self._location(sha))


# -- a directory --------------------------------------------------------------------------------

class FileStore:
    """Artifacts as files under `root`, content-addressed."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def path(self, sha256: str) -> Path:
        sha = _checked_sha(sha256)
        return self.root / sha[:2] / sha[2:4] / sha

    def _artifact(self, sha: str, size: int) -> Artifact:
        path = self.path(sha)
        try:
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            meta = {}
        return Artifact(sha, sha, size, path.as_uri(), str(meta.get("name", "")),
                        str(meta.get("content_type") or DEFAULT_CONTENT_TYPE))

    def info(self, sha256: str) -> Artifact | None:
        try:
            size = self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None
        return self._artifact(sha256, size)

    def put(self, name: str, content_type: str, data: bytes) -> Artifact:
        data = _checked_put(name, content_type, data)
        sha = sha256_of(data)
        known = self.info(sha)
        if known is not None and known.size == len(data):
            return known
        path = self.path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"name": name, "content_type": content_type}).encode("utf-8")
        # the metadata first (kept if another writer's is there), then the bytes: a file that
        # exists is whole and described
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            _write_atomically(meta_path, meta)
        _write_atomically(path, data)  # the same bytes whoever wins the rename
        return self._artifact(sha, len(data))

    def get(self, sha256: str) -> bytes:
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {sha256} in {self.root}") from None
        return _verified(sha256, data, str(path))


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_store(cfg: Any, *, timeout_ms: int = 5000) -> ArtifactStore:
    """The store LABBUS_ARTIFACTS names (`Config.artifacts`): "gridfs", the bucket `artifacts`
    of LABBUS_MONGO_DB, or a directory (a FileStore). Mongo calls give up after `timeout_ms`
    (pymongo's default server selection waits 30 s) and raise; the caller retries."""
    if cfg.artifacts != "gridfs":
        return FileStore(cfg.artifacts)
    from pymongo import MongoClient

    client = MongoClient(cfg.mongo_url, serverSelectionTimeoutMS=timeout_ms,
                         connectTimeoutMS=timeout_ms, socketTimeoutMS=max(timeout_ms, 30000))
    return GridFSStore(client[cfg.mongo_db])
