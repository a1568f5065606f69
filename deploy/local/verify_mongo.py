"""Check that the Mongo server at LABBUS_MONGO_URL does what labbus needs, through pymongo.

    python -m labbus.deploy.local.verify_mongo      # exit status 0 when every check passes

Each check runs in a scratch database that is dropped afterwards.
"""

from __future__ import annotations

import sys
import traceback
import uuid
from collections.abc import Callable

import pymongo
from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from labbus.events import config


def _newer_than(t: int) -> dict:
    """The projection guard labbus uses: apply only if the stored position is older (or absent)."""
    return {"$or": [{"pos.t": {"$lt": t}}, {"pos.t": {"$exists": False}}]}


def check_insert_find(db: Database) -> str:
    c = db.things
    c.insert_one({"_id": "a", "kind": "x", "n": 1})
    c.insert_many([{"_id": "b", "kind": "y", "n": 2}, {"_id": "c", "kind": "x", "n": 3}])
    assert c.find_one({"_id": "a"}) == {"_id": "a", "kind": "x", "n": 1}
    assert sorted(d["_id"] for d in c.find({"kind": "x"})) == ["a", "c"]
    assert [d["n"] for d in c.find({"n": {"$gte": 2}}, {"_id": 0, "n": 1}).sort("n", 1)] == [2, 3]
    return "insert_one, insert_many, find_one, find with filter and projection"


def check_upsert_set(db: Database) -> str:
    c = db.upserts
    r = c.update_one({"_id": "s1"}, {"$set": {"state": "idle"}}, upsert=True)
    assert r.upserted_id == "s1", r.raw_result
    r = c.update_one({"_id": "s1"}, {"$set": {"state": "busy"}}, upsert=True)
    assert (r.matched_count, r.modified_count, r.upserted_id) == (1, 1, None), r.raw_result
    assert c.find_one({"_id": "s1"}) == {"_id": "s1", "state": "busy"}
    return "update_one(upsert=True) with $set inserts, then updates"


def check_inc_max_dotted(db: Database) -> str:
    c = db.counters
    for value in (5, 3, 9):
        c.update_one({"_id": "k"}, {"$inc": {"stats.count": 1, "stats.sum": value},
                                    "$max": {"stats.hi": value}, "$set": {"pos.t": value}},
                     upsert=True)
    doc = c.find_one({"_id": "k"})
    assert doc == {"_id": "k", "stats": {"count": 3, "sum": 17, "hi": 9}, "pos": {"t": 9}}, doc
    assert c.count_documents({"stats.hi": {"$gt": 8}}) == 1
    return "$inc, $max and $set on dotted paths (created on upsert)"


def check_bulk_guarded_upsert(db: Database) -> str:
    c = db.positions
    c.insert_one({"_id": "a", "pos": {"t": 3}, "v": "old"})
    c.insert_one({"_id": "n", "v": "no position yet"})
    ops = [UpdateOne({"_id": "a", **_newer_than(5)}, {"$set": {"pos.t": 5, "v": "new"}},
                     upsert=True),
           UpdateOne({"_id": "b", **_newer_than(5)}, {"$set": {"pos.t": 5, "v": "first"}},
                     upsert=True),
           UpdateOne({"_id": "n", **_newer_than(2)}, {"$set": {"pos.t": 2, "v": "set"}},
                     upsert=True)]
    r = c.bulk_write(ops, ordered=False)
    assert (r.matched_count, r.modified_count, r.upserted_count) == (2, 2, 1), r.bulk_api_result
    assert c.find_one({"_id": "a"}) == {"_id": "a", "pos": {"t": 5}, "v": "new"}
    assert c.find_one({"_id": "b"}) == {"_id": "b", "pos": {"t": 5}, "v": "first"}, (
        c.find_one({"_id": "b"}))
    assert c.find_one({"_id": "n"}) == {"_id": "n", "v": "set", "pos": {"t": 2}}
    # A stale update: the guard doesn't match, so the upsert tries to insert _id "a" again.
    # MongoDB answers with a duplicate-key write error (11000) and leaves the document alone.
    stale = [UpdateOne({"_id": "a", **_newer_than(4)}, {"$set": {"pos.t": 4, "v": "stale"}},
                       upsert=True),
             UpdateOne({"_id": "c", **_newer_than(1)}, {"$set": {"pos.t": 1}}, upsert=True)]
    try:
        c.bulk_write(stale, ordered=False)
        raise AssertionError("stale guarded upsert raised no duplicate-key error "
                             "(MongoDB raises 11000)")
    except BulkWriteError as e:
        codes = [w["code"] for w in e.details["writeErrors"]]
        assert codes == [11000], e.details
        assert e.details["nUpserted"] == 1, e.details  # unordered: the other op still applied
    assert c.find_one({"_id": "a"}) == {"_id": "a", "pos": {"t": 5}, "v": "new"}
    assert c.find_one({"_id": "c"}) == {"_id": "c", "pos": {"t": 1}}
    return ("bulk_write(UpdateOne(upsert=True), ordered=False) with an $or/$lt/$exists guard: "
            "applies newer, upserts missing, stale ones fail with 11000 like MongoDB "
            "and change nothing")


def check_indexes(db: Database) -> str:
    c = db.indexed
    name = c.create_index([("site", ASCENDING), ("t", DESCENDING)])
    uniq = c.create_index("key", unique=True)
    info = c.index_information()
    assert name in info and uniq in info and info[uniq].get("unique") is True, info
    c.insert_one({"key": 1, "site": "s", "t": 1})
    try:
        c.insert_one({"key": 1, "site": "s", "t": 2})
        raise AssertionError("unique index did not reject a duplicate")
    except DuplicateKeyError:
        pass
    assert c.create_index("key", unique=True) == uniq  # idempotent
    return "create_index (compound, unique; idempotent), index_information, unique violation raises"


def check_sort_skip_limit(db: Database) -> str:
    c = db.paged
    c.insert_many([{"n": n, "g": n % 2} for n in range(10)])
    assert [d["n"] for d in c.find().sort("n", DESCENDING).skip(2).limit(3)] == [7, 6, 5]
    got = [(d["g"], d["n"]) for d in c.find({}, {"_id": 0}).sort([("g", 1), ("n", -1)]).limit(3)]
    assert got == [(0, 8), (0, 6), (0, 4)], got
    return "find().sort() (single and compound) .skip().limit()"


def check_aggregate(db: Database) -> str:
    c = db.readings
    c.insert_many([{"site": s, "v": v}
                   for s, v in [("a", 1), ("a", 4), ("b", 2), ("c", 10), ("b", 7)]])
    out = list(c.aggregate([{"$match": {"v": {"$gte": 2}}},
                            {"$group": {"_id": "$site", "n": {"$sum": 1}, "hi": {"$max": "$v"},
                                        "avg": {"$avg": "$v"}}},
                            {"$sort": {"hi": -1}}]))
    assert out == [{"_id": "c", "n": 1, "hi": 10, "avg": 10.0},
                   {"_id": "b", "n": 2, "hi": 7, "avg": 4.5},
                   {"_id": "a", "n": 1, "hi": 4, "avg": 4.0}], out
    return "aggregate $match → $group ($sum/$max/$avg) → $sort"


def check_count_documents(db: Database) -> str:
    c = db.counted
    c.insert_many([{"k": i % 3} for i in range(9)])
    assert c.count_documents({}) == 9
    assert c.count_documents({"k": 1}) == 3
    assert c.count_documents({"k": {"$in": [0, 2]}}, limit=4) == 4
    assert c.estimated_document_count() == 9
    return "count_documents (with filter, limit), estimated_document_count"


def check_transaction(db: Database) -> str:
    client = db.client
    a, b = db.tx_a, db.tx_b
    a.insert_one({"_id": "seed"})  # collections exist before the transaction
    b.insert_one({"_id": "seed"})
    with client.start_session() as s:
        with s.start_transaction():
            a.insert_one({"_id": 1}, session=s)
            b.update_one({"_id": "seed"}, {"$set": {"x": 1}}, session=s)
            assert a.find_one({"_id": 1}) is None, (
                "uncommitted insert visible outside the transaction")
            assert a.find_one({"_id": 1}, session=s) == {"_id": 1}, "own write not visible inside"
    assert (a.find_one({"_id": 1}) == {"_id": 1}
            and b.find_one({"_id": "seed"}) == {"_id": "seed", "x": 1})
    try:
        with client.start_session() as s:
            with s.start_transaction():
                a.insert_one({"_id": 2}, session=s)
                b.update_one({"_id": "seed"}, {"$set": {"x": 2}}, session=s)
                raise RuntimeError("abort")
    except RuntimeError:
        pass
    assert a.find_one({"_id": 2}) is None and b.find_one({"_id": "seed"})["x"] == 1, (
        "abort left writes")
    return ("multi-document transaction: commit is atomic and isolated, "
            "an exception aborts both writes")


def check_write_conflict(db: Database) -> str:
    client = db.client
    c = db.conflicts
    c.insert_one({"_id": 1, "v": 0})
    with client.start_session() as s1, client.start_session() as s2:
        s1.start_transaction()
        s2.start_transaction()
        c.update_one({"_id": 1}, {"$inc": {"v": 1}}, session=s1)
        try:
            c.update_one({"_id": 1}, {"$inc": {"v": 10}}, session=s2)
            raise AssertionError("a concurrent transactional write to the same document "
                                 "did not conflict")
        except pymongo.errors.OperationFailure as e:
            assert e.code == 112 and e.has_error_label("TransientTransactionError"), (
                e.code, e.details)
        finally:
            if s2.in_transaction:
                s2.abort_transaction()
        s1.commit_transaction()
    assert c.find_one({"_id": 1})["v"] == 1
    return ("concurrent transactions writing one document: "
            "WriteConflict (112, TransientTransactionError)")


def check_set_on_insert_ttl_index(db: Database) -> str:
    """What the Mongo projector's memory of measurement ids uses."""
    c = db.seen
    name = c.create_index("at", expireAfterSeconds=3600)
    assert c.index_information()[name].get("expireAfterSeconds") == 3600, c.index_information()
    c.bulk_write([UpdateOne({"_id": i}, {"$setOnInsert": {"at": 1}}, upsert=True)
                  for i in ("m1", "m2")], ordered=False)
    c.bulk_write([UpdateOne({"_id": i}, {"$setOnInsert": {"at": 2}}, upsert=True)
                  for i in ("m2", "m3")], ordered=False)
    assert {d["_id"]: d["at"] for d in c.find()} == {"m1": 1, "m2": 1, "m3": 2}
    return "$setOnInsert upserts keep the first value; TTL index created (expiry not waited for)"


CHECKS: list[Callable[[Database], str]] = [
    check_insert_find, check_upsert_set, check_inc_max_dotted, check_bulk_guarded_upsert,
    check_indexes, check_sort_skip_limit, check_aggregate, check_count_documents,
    check_transaction, check_write_conflict, check_set_on_insert_ttl_index,
]


def verify(url: str) -> list[tuple[str, bool, str]]:
    """Run every check; [(name, passed, detail)]."""
    results = []
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        for check in CHECKS:
            name = check.__name__.removeprefix("check_")
            db = client[f"labbus_verify_{uuid.uuid4().hex[:8]}"]
            try:
                results.append((name, True, check(db)))
            except Exception as e:
                where = traceback.extract_tb(e.__traceback__)[-1]
                results.append((name, False, f"{type(e).__name__}: {e} (line {where.lineno})"))
            finally:
                try:
                    client.drop_database(db.name)
                except Exception:
                    pass
    finally:
        client.close()
    return results


def main() -> int:
    cfg = config.load()
    print(f"Mongo server: {cfg.mongo_url}")
    try:
        pymongo.MongoClient(cfg.mongo_url, serverSelectionTimeoutMS=3000).admin.command("ping")
    except Exception as e:
        print(f"not reachable ({e}); start it with deploy.local.services.up()")
        return 2
    results = verify(cfg.mongo_url)
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    failed = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failed}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
