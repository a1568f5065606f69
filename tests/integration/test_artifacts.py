"""The artifact store (events/artifacts.py) against the real Mongo-compatible server (GridFS in
a database of this test's own) and a temporary directory: the same contract for both. Stored
once per sha256 (a second put of the same bytes stores no second copy, also when 8 threads put
them at once), read back verified, an unknown sha256 is ArtifactNotFound, bytes altered in the
store are ArtifactCorrupt, and an upload whose writer died midway is cleaned up by the next
put. A real report (the PDF of tests/support/pv_reports.py) round-trips."""

from __future__ import annotations

import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from pymongo import MongoClient

from labbus.events import config
from labbus.events.artifacts import (
    ArtifactCorrupt,
    ArtifactNotFound,
    FileStore,
    GridFSStore,
    sha256_of,
)

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def mongo_db(base_env):
    cfg = config.load(base_env)
    client = MongoClient(cfg.mongo_url, serverSelectionTimeoutMS=5000)
    name = f"labbus_test_artifacts_{uuid.uuid4().hex[:8]}"
    yield client[name]
    client.drop_database(name)
    client.close()


@pytest.fixture(params=["gridfs", "files"])
def store(request, tmp_path):
    if request.param == "gridfs":
        db = request.getfixturevalue("mongo_db")
        return GridFSStore(db, bucket=f"a{uuid.uuid4().hex[:8]}", writer_wait_s=1.0)
    return FileStore(tmp_path / "artifacts")


def copies(store, sha: str) -> int:
    """How many stored copies of these bytes there are."""
    if isinstance(store, GridFSStore):
        return store.files.count_documents({"_id": sha})
    return sum(1 for p in store.root.rglob("*") if p.is_file() and p.name == sha)


def chunk_count(store, sha: str) -> int:
    return store.chunks.count_documents({"files_id": sha})


def test_put_then_get_round_trips_and_describes_the_artifact(store):
    data = os.urandom(700_000)  # 3 GridFS chunks
    a = store.put("SR-1.pdf", "application/pdf", data)
    assert a.sha256 == a.id == hashlib.sha256(data).hexdigest()
    assert a.size == len(data) and a.name == "SR-1.pdf" and a.content_type == "application/pdf"
    assert a.location.startswith("gridfs://" if isinstance(store, GridFSStore) else "file:///")
    assert store.get(a.sha256) == data
    assert store.info(a.sha256) == a


def test_the_same_bytes_are_stored_once(store):
    data = b"%PDF-1.4 the same report twice\n" * 1000
    first = store.put("SR-2.pdf", "application/pdf", data)
    again = store.put("SR-2-regenerated.pdf", "application/pdf", data)
    assert again == first  # the first put's name is kept
    assert copies(store, first.sha256) == 1
    if isinstance(store, GridFSStore):
        assert chunk_count(store, first.sha256) == 1
    other = store.put("SR-3.pdf", "application/pdf", data + b"x")
    assert other.sha256 != first.sha256 and store.get(other.sha256) == data + b"x"


def test_concurrent_puts_of_the_same_bytes_store_one_copy(store):
    data = os.urandom(600_000)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: store.put(f"r{k}.xlsx", "application/x", data),
                                range(8)))
    sha = sha256_of(data)
    assert {r.sha256 for r in results} == {sha} and {r.size for r in results} == {len(data)}
    assert copies(store, sha) == 1
    if isinstance(store, GridFSStore):
        assert chunk_count(store, sha) == 3
    assert store.get(sha) == data


def test_unknown_and_malformed_addresses(store):
    with pytest.raises(ArtifactNotFound):
        store.get("0" * 64)
    assert store.info("0" * 64) is None
    with pytest.raises(ValueError, match="not a sha256"):
        store.get("../../etc/passwd")
    with pytest.raises(TypeError):
        store.put("x", "text/plain", "not bytes")


def test_bytes_altered_in_the_store_are_refused(store):
    a = store.put("SR-4.csv", "text/csv", b"request_id,verdict\r\nSR-4,pass\r\n")
    if isinstance(store, GridFSStore):
        store.chunks.update_one({"files_id": a.sha256, "n": 0},
                                {"$set": {"data": b"request_id,verdict\r\nSR-4,fail\r\n"}})
    else:
        store.path(a.sha256).write_bytes(b"request_id,verdict\r\nSR-4,fail\r\n")
    with pytest.raises(ArtifactCorrupt, match=a.sha256):
        store.get(a.sha256)


def test_gridfs_an_upload_whose_writer_died_is_redone(mongo_db):
    """A writer that died after some chunks and before the files document leaves orphan chunks
    under the sha256; the next put waits for it, then removes them and stores the bytes."""
    store = GridFSStore(mongo_db, bucket=f"a{uuid.uuid4().hex[:8]}", writer_wait_s=0.5)
    data = os.urandom(300_000)
    sha = sha256_of(data)
    store.put("seed.bin", "application/octet-stream", b"creates the bucket's indexes")
    store.chunks.insert_one({"files_id": sha, "n": 0, "data": data[:1000]})  # died here
    a = store.put("SR-5.pdf", "application/pdf", data)
    assert a.sha256 == sha and store.get(sha) == data
    assert chunk_count(store, sha) == 2


def test_gridfs_uses_the_bucket_indexes_that_refuse_a_second_copy(mongo_db):
    store = GridFSStore(mongo_db, bucket=f"a{uuid.uuid4().hex[:8]}")
    store.put("x.bin", "application/octet-stream", b"x")
    unique = [ix for ix in store.chunks.list_indexes() if ix.get("unique")]
    assert [dict(ix["key"]) for ix in unique] == [{"files_id": 1, "n": 1}]


def test_a_real_report_round_trips(store):
    from labbus.processors.reports import CONTENT_TYPES, render_pdf
    from tests.support.pv_reports import service_request

    pdf = render_pdf(service_request())
    a = store.put("SR-2026-0042.pdf", CONTENT_TYPES["pdf"], pdf)
    assert store.get(a.sha256) == pdf and a.size == len(pdf)
    assert store.put("SR-2026-0042.pdf", CONTENT_TYPES["pdf"], render_pdf(service_request())) \
        == a  # regenerated: the same bytes, the same artifact
