"""Reports of a service request: the PDF (with charts and, when every protocol passed, a
certificate page), the Excel workbook and the CSV of all criteria results. Pure: no Kafka, no
database, no clock; the input is `model.ServiceRequestReport` and each generator returns bytes,
the same bytes for the same input.

    from labbus.processors.reports import render_pdf, render_xlsx, render_criteria_csv
"""

from labbus.processors.reports.csv_export import render_criteria_csv
from labbus.processors.reports.model import (
    ExecutionReport,
    NonConformance,
    ReportInputError,
    ReportSection,
    Sample,
    Series,
    ServiceRequestReport,
    Standard,
    StepReadings,
    execution_from_evaluation,
)
from labbus.processors.reports.pdf import render_pdf
from labbus.processors.reports.xlsx import render_xlsx

CONTENT_TYPES = {
    "pdf": "application/pdf",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "csv": "text/csv; charset=utf-8",
}

__all__ = ["CONTENT_TYPES", "ExecutionReport", "NonConformance", "ReportInputError",
           "ReportSection", "Sample", "Series", "ServiceRequestReport", "Standard",
           "StepReadings", "execution_from_evaluation", "render_criteria_csv", "render_pdf",
           "render_xlsx"]
