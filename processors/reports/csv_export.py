"""The CSV export of a service request: one file, one row per criterion of every execution.

Format (RFC 4180): UTF-8 without a byte-order mark, comma-separated, CRLF line ends, fields
quoted only when they hold a comma, a quote or a line break; a header row with the columns of
`COLUMNS`, in that order:

- request_id, execution_id, sample_id, protocol_id, template_version, template_sha256: which
  execution, and which template version (and its content hash) it ran;
- criterion_id, description, clause: the criterion and the clause of the standard it checks;
- value: the judged value (empty when it could not be computed; see message);
- operator: `<=`, `<`, `>=`, `>`, `==` or `between`;
- limit, limit_high: the limit; for `between` the low and the high limit (both inclusive),
  otherwise limit_high is empty; empty when it could not be computed;
- unit: of value and limits (`1` for a plain number);
- verdict: `pass`, `fail` or `not_applicable` (a criterion whose `applies_if` did not hold);
- message: the readable judgement ("Pmax degradation after thermal cycling: 6.1 %, limit
  <= 5 %: fail");
- execution_verdict: `pass` or `fail`, the execution's overall verdict.

Numbers are written in Python's shortest round-trip form (`repr`), so reading them back gives
the same float. Rows follow the executions' order in the report, then the template's order of
the criteria.
"""

from __future__ import annotations

import csv
import io

from labbus.processors.reports.model import ServiceRequestReport, limit_parts

COLUMNS = ("request_id", "execution_id", "sample_id", "protocol_id", "template_version",
           "template_sha256", "criterion_id", "description", "clause", "value", "operator",
           "limit", "limit_high", "unit", "verdict", "message", "execution_verdict")


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def render_criteria_csv(report: ServiceRequestReport) -> bytes:
    """All criteria results of the request as CSV (module docstring); same input, same bytes."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for e in report.executions:
        for c in e.criteria:
            low, high = limit_parts(c)
            writer.writerow((report.request_id, e.execution_id, e.sample_id, e.protocol_id,
                             e.template_version, e.template_sha256, c.id, c.description,
                             c.clause, _number(c.value), c.operator, _number(low),
                             _number(high), c.unit, c.verdict, c.message, e.verdict))
    return out.getvalue().encode("utf-8")
