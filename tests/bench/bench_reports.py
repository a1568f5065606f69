"""Report generation benchmark: the PDF, the workbook and the criteria CSV of a service request
with three protocols (PVTP-001 Pmax at STC, PVTP-015 TC200, PVTP-003 insulation) on one
sample, the realistic request of the unit tests (tests/support/pv_reports.py: 100-point pvlib
I-V sweeps, ~3,400 chamber readings of 200 cycles, QC of the shipped templates).

    .venv/bin/python tests/bench/bench_reports.py [--runs 30] [--samples 1] [--passing]

Each format is rendered `--runs` times in this process after one warm-up render (fonts,
matplotlib's caches): p50, p99 (the highest of fewer than 100 runs) and the size. `--samples N`
makes the request N samples x 3 protocols. The machine's load average is printed with the
figures: on a shared machine they depend on it. No service is needed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from labbus.processors.reports import render_criteria_csv, render_pdf, render_xlsx  # noqa: E402
from tests.support.pv_reports import FAILS_TC, PASSES_ALL, service_request  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--passing", action="store_true",
                        help="samples that pass everything (the PDF gets its certificate page)")
    args = parser.parse_args()
    first = PASSES_ALL if args.passing else FAILS_TC
    ids = (first,) + tuple(f"S{100 + k:03d}" for k in range(1, args.samples))
    t = time.perf_counter()
    report = service_request(ids)
    build_s = time.perf_counter() - t
    readings = sum(len(s.values) for e in report.executions for st in e.steps
                   for s in st.series)
    print(f"request: {len(report.samples)} sample(s) x 3 protocols = {len(report.executions)} "
          f"executions, {readings} readings, verdict {report.verdict}; input built in "
          f"{build_s:.2f} s (simulation and QC, not counted below)")
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f} on {os.cpu_count()} cores")
    for name, render in (("pdf", render_pdf), ("xlsx", render_xlsx),
                         ("csv", render_criteria_csv)):
        data = render(report)  # warm-up
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            again = render(report)
            times.append(time.perf_counter() - t)
            assert again == data, f"{name}: not the same bytes"
        print(f"{name:5s} p50 {statistics.median(times) * 1000:8.1f} ms  p99 "
              f"{percentile(times, 0.99) * 1000:8.1f} ms  ({args.runs} runs)  "
              f"{len(data) / 1024:8.1f} KiB  sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
