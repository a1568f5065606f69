"""Token benchmark: what the bearer-token check costs the query API. Requests/s of the same reads
through two instances of the API in one run, one built as `labbus api` builds it (every request's
token verified: signature, claims, roles) and one built with `create_app(cfg, auth=False)` (the
same routes, no check; a constructor argument, no setting, so production cannot turn it off).

    .venv/bin/python tests/bench/bench_auth.py [--duration 10] [--rounds 3] [--concurrency 8]

1. A PostgreSQL database of its own (dropped at the end), migrated, with 50 devices registered
   and 200 validated readings of one of them, written through the projection code (the routes
   benchmarked read PostgreSQL only).
2. A stand-in OpenID provider on loopback (tests/support/idp.py: discovery document and JWKS
   over real HTTP) and a viewer's ES256 token it signed; the checked API trusts it
   (LABBUS_AUTH_ISSUER) and fetches its keys once, then verifies from the cache.
3. Both APIs as separate processes, one uvicorn worker each (as `labbus api` runs); checked: the
   checked one answers 401 without the token and 200 with it, the open one 200 without.
4. `hey` (tests/bench/bench_query.py finds or installs it) drives each route, closed loop,
   `--concurrency` connections for `--duration` s; the two instances alternate, `--rounds` times,
   so that the machine's other load falls on both alike. Per route: the median requests/s of each
   and their ratio (target >= 0.9), p50/p99, and the API worker's CPU time per request (less
   moved by other users of the machine than requests/s).
5. In process: TokenVerifier.verify with cached keys, over 3,000 different tokens (each one's
   signature checked) and 3,000 times one token (remembered after its first check, as a
   client's token is between its requests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labbus.deploy.local import postgres  # noqa: E402
from labbus.events import config  # noqa: E402
from tests.bench.bench_query import hey_binary, run_hey  # noqa: E402
from tests.conftest import free_port, wait_for  # noqa: E402
from tests.support.idp import Tokens  # noqa: E402

DEVICES = 50
READINGS = 200


def serve(port: int, auth: bool) -> None:
    """One API instance (the bench starts two of these as processes)."""
    import uvicorn

    from labbus.api.app import create_app

    uvicorn.run(create_app(config.load(), auth=auth), host="127.0.0.1", port=port,
                log_config=None, access_log=False)


def seed(cfg: config.Config) -> str:
    """Devices and readings through the projection code; the device with readings."""
    from aiokafka import TopicPartition

    from labbus.events.codec import default_codec
    from labbus.events.model import DeviceRegistered, MeasurementValidated
    from labbus.events.runtime import Positioned
    from labbus.projections.postgres import PostgresProjection

    codec = default_codec()
    t0 = datetime.now(UTC) - timedelta(hours=1)
    events = [DeviceRegistered.create(
        source="bench", subject=f"bench-{i:04d}", sequence=0, device_id=f"bench-{i:04d}",
        device_type="ph-meter", model="m", location="bench", metrics=["ph"])
        for i in range(DEVICES)]
    events += [MeasurementValidated.create(
        source="bench", subject="bench-0000", sequence=i, measurement_id=uuid.uuid4(),
        device_id="bench-0000", metric="ph", value=7.0 + i / 1000, unit="pH",
        measured_at=t0 + timedelta(seconds=i)) for i in range(READINGS)]
    tp = TopicPartition("bench-auth", 0)
    batch = [Positioned(tp, offset, *codec.decode_record(codec.encode(e), plain=True))
             for offset, e in enumerate(events)]

    async def write() -> None:
        pg = PostgresProjection(cfg)
        await pg.start()
        try:
            await pg.apply(batch, {})
        finally:
            await pg.stop()

    asyncio.run(write())
    return "bench-0000"


def verify_cost(tokens: Tokens, cfg: config.Config, n: int = 3000) -> tuple[float, float]:
    """Microseconds per TokenVerifier.verify with the keys cached: of n different tokens (each
    signature checked), and of one token n times (remembered after the first)."""
    from labbus.events.tokens import TokenVerifier

    distinct = [tokens.token(f"bench-{i}", ("viewer",)) for i in range(n)]

    async def go() -> tuple[float, float]:
        verifier = TokenVerifier.from_config(tokens.config(cfg))
        try:
            await verifier.verify(tokens.token())  # fetches the keys
            started = time.perf_counter()
            for token in distinct:
                await verifier.verify(token)
            full = (time.perf_counter() - started) / n * 1e6
            started = time.perf_counter()
            for _ in range(n):
                await verifier.verify(distinct[0])
            return full, (time.perf_counter() - started) / n * 1e6
        finally:
            await verifier.aclose()

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="Seconds per hey run.")
    ap.add_argument("--rounds", type=int, default=3, help="Runs of each instance per route.")
    ap.add_argument("--concurrency", type=int, default=8, help="hey -c.")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: one instance
    ap.add_argument("--auth", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.auth == "on")
        return

    base = config.load()
    hey = hey_binary(base.home)
    run = uuid.uuid4().hex[:8]
    name = f"labbus_bench_auth_{run}"
    tokens = Tokens()
    procs: list[subprocess.Popen] = []
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    try:
        dsn = postgres.create_database(base, name)
        cfg = replace(base, postgres_dsn=dsn,
                      postgres_api_dsn=postgres.with_database(base.postgres_api_dsn, name),
                      mongo_db=name)
        device = seed(cfg)
        token = tokens.token("bench-viewer", ("viewer",))
        env = dict(os.environ, LABBUS_POSTGRES_DSN=cfg.postgres_dsn,
                   LABBUS_POSTGRES_API_DSN=cfg.postgres_api_dsn, LABBUS_MONGO_DB=name,
                   LABBUS_LOG_LEVEL="WARNING", **tokens.env)
        urls = {}
        for auth in ("on", "off"):
            port = free_port()
            log = open(Path("/tmp") / f"{name}-api-auth-{auth}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), "--auth", auth], env=env,
                stdout=log, stderr=subprocess.STDOUT))
            urls[auth] = f"http://127.0.0.1:{port}"
            wait_for(lambda u=urls[auth]: _ready(u), 60, f"the API (auth {auth})")
        bearer = {"Authorization": f"Bearer {token}"}
        routes = ["/devices?limit=20", f"/devices/{device}/measurements?limit=100"]
        for route in routes:
            assert httpx.get(urls["on"] + route).status_code == 401
            assert httpx.get(urls["on"] + route, headers=bearer).status_code == 200
            assert httpx.get(urls["off"] + route).status_code == 200
        header = ["-H", f"Authorization: Bearer {token}"]
        pids = {"on": procs[0].pid, "off": procs[1].pid}
        results: dict[tuple[str, str], list[dict]] = {}
        for route in routes:
            for auth in ("on", "off"):  # warm-up: statement caches, pools, the JWKS
                run_hey(hey, urls[auth] + route, "-z", "3s", "-c", str(args.concurrency),
                        *header)
            for _ in range(args.rounds):
                for auth in ("on", "off"):
                    # the open instance gets the header too: the same bytes on the wire
                    r = run_hey(hey, urls[auth] + route, "-z", f"{args.duration}s", "-c",
                                str(args.concurrency), *header, api_pid=pids[auth])
                    assert set(r["codes"]) == {"200"}, r
                    results.setdefault((route, auth), []).append(r)
        full, remembered = verify_cost(tokens, cfg)
        print(f"\nhey, {args.duration} s per run, {args.concurrency} connections, one uvicorn "
              f"worker per instance, {args.rounds} alternating runs each (load average now "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}):")
        print(f"  {'route':42} {'instance':9} {'req/s (median, runs)':34} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'API µs/req':>10}")
        for route in routes:
            med = {}
            for auth in ("on", "off"):
                rs = results[(route, auth)]
                med[auth] = statistics.median(r["rps"] for r in rs)
                runs = ", ".join(f"{r['rps']:.0f}" for r in rs)
                print(f"  {route:42} {'token' if auth == 'on' else 'no check':9} "
                      f"{med[auth]:7.0f} ({runs}){'':{max(0, 24 - len(runs))}} "
                      f"{statistics.median(r['p50'] for r in rs):7.2f} "
                      f"{statistics.median(r['p99'] for r in rs):7.2f} "
                      f"{statistics.median(r['api_us'] for r in rs):10.0f}")
            cpu = {a: statistics.median(r["api_us"] for r in results[(route, a)])
                   for a in ("on", "off")}
            ratio = med["on"] / med["off"]
            print(f"  -> ratio {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})"
                  f"; the check's CPU per request {cpu['on'] - cpu['off']:.0f} µs")
        print(f"\nTokenVerifier.verify with cached keys, in process, 3,000 in a row: {full:.0f} µs "
              f"per token (different tokens: signature checked), {remembered:.1f} µs (the same "
              "token again: remembered)")
        print(f"JWKS fetched from the issuer during the run: {tokens.provider.jwks_fetches} "
              "(once by the checked API, once by the in-process timing)")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        tokens.close()
        postgres.drop_database(base, name)


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
