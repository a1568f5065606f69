"""The response bodies of the query API, as declared in its OpenAPI (and checked against it by
the schemathesis test). JSON columns whose content the events do not fix are `Any`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

NEXT_CURSOR = Field(description="Pass as `cursor` for the next page; null on the last page.")


class Device(BaseModel):
    device_id: str
    device_type: str
    model: str
    location: str
    metrics: list[str]
    attributes: dict[str, Any]
    registered_at: datetime


class DevicePage(BaseModel):
    items: list[Device]
    next_cursor: str | None = NEXT_CURSOR


class Latest(BaseModel):
    value: float
    unit: str
    measured_at: datetime
    measurement_id: str


class DeviceDetail(BaseModel):
    """Metadata from PostgreSQL (absent while only readings are known), latest values and counts
    from MongoDB."""

    device_id: str
    device_type: str | None = None
    model: str | None = None
    location: str | None = None
    metrics: list[str] | None = None
    attributes: dict[str, Any] | None = None
    registered_at: datetime | None = None
    latest: dict[str, Latest] = Field(description="Per metric, its latest reading.")
    counts: dict[str, int] = Field(description="Per metric, its number of readings.")
    total_measurements: int


class Measurement(BaseModel):
    measurement_id: uuid.UUID
    metric: str
    value: float
    unit: str
    measured_at: datetime


class MeasurementPage(BaseModel):
    items: list[Measurement]
    next_cursor: str | None = NEXT_CURSOR


class Experiment(BaseModel):
    experiment_id: str
    status: str = Field(description="running, completed, failed or rejected.")
    target_hex: str | None
    target_lab: list[float] | None
    dyes: list[str] | None
    budget_wells: int | None
    batch_size: int | None
    tolerance_de: float | None
    requested_by: str | None
    requested_at: datetime | None
    iterations: int
    wells_used: int | None
    best_well: str | None
    best_volumes: dict[str, float] | None
    best_de: float | None
    reason: str | None
    finished_at: datetime | None


class ExperimentPage(BaseModel):
    items: list[Experiment]
    next_cursor: str | None = NEXT_CURSOR


class RobotRun(BaseModel):
    run_id: str
    iteration: int
    status: str = Field(description="requested, running, succeeded or failed.")
    protocol_hash: str | None
    mode: str | None
    commands: int | None
    wells: int | None
    error: str | None
    requested_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class WellCounts(BaseModel):
    proposed: int
    dispensed: int
    measured: int
    scored: int


class RunSummary(BaseModel):
    status: str | None
    command_types: dict[str, int]
    command_statuses: dict[str, int]


class ExperimentSummary(BaseModel):
    wells: WellCounts
    best_de: float | None
    runs: dict[str, RunSummary]


class ExperimentDetail(Experiment):
    runs: list[RobotRun]
    summary: ExperimentSummary | None = Field(
        description="From MongoDB; null when MongoDB has no document for it or does not answer.")


class Well(BaseModel):
    well: str
    iteration: int | None
    volumes: dict[str, float] | None = Field(description="Proposed: dye -> µL.")
    water_ul: float | None
    run_id: str | None
    dispensed: dict[str, float] | None = Field(
        description="What the robot's commands put in: source -> µL.")
    rgb: list[int] | None
    lab: list[float] | None
    instrument_id: str | None
    delta_e: float | None
    proposed_at: datetime | None
    dispensed_at: datetime | None
    measured_at: datetime | None
    scored_at: datetime | None


class WellList(BaseModel):
    items: list[Well]


class Command(BaseModel):
    index: int
    command_id: str
    command_key: str | None
    command_type: str
    status: str
    params: Any
    result: Any
    error: Any
    created_at: str | None
    started_at: str | None
    completed_at: str | None


class CommandPage(BaseModel):
    items: list[Command]
    next_cursor: str | None = NEXT_CURSOR


class Live(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="ok, or unavailable.")
    checks: dict[str, str] = Field(description="postgres and mongo: ok, or why not.")
