"""The testing processor (`labbus process testing`): service requests and test protocol
executions on the one faust driver, state per request and per execution in one Table.

Inputs (co-partitioned, 6 partitions each): lab.testing.requests (request id),
lab.testing.executions (execution id), lab.testing.inbox (the repartition topic: execution or
request id), lab.commands and lab.measurements.recorded (device id; only forwarded to the inbox).
Registrations (lab.devices and lab.testing.samples) are a `View` every worker reads in full: the
devices a step may use, the samples a request may name.
The logic is plain code in `processors/testing_logic.py`; see its docstring for the workflow,
the correlation of commands and readings, the choice of devices and the timeouts.
"""

from __future__ import annotations

import functools
from typing import Any

from labbus.events import faust_runtime
from labbus.events.config import Config
from labbus.events.protocols import shipped_catalog
from labbus.events.topics import (
    COMMANDS,
    DEVICES,
    MEASUREMENTS_RECORDED,
    TESTING_EXECUTIONS,
    TESTING_INBOX,
    TESTING_REQUESTS,
    TESTING_SAMPLES,
    topic_name,
)
from labbus.processors.testing_logic import ACCEPTS, Settings, Ticker, handle, registry_reader

PROCESS = "testing"
INPUTS = (TESTING_REQUESTS, TESTING_EXECUTIONS, TESTING_INBOX, COMMANDS, MEASUREMENTS_RECORDED)


def settings(cfg: Config) -> Settings:
    return Settings(catalog=shipped_catalog(), requests=topic_name(cfg, TESTING_REQUESTS),
                    executions=topic_name(cfg, TESTING_EXECUTIONS),
                    commands=topic_name(cfg, COMMANDS),
                    measurements=topic_name(cfg, MEASUREMENTS_RECORDED),
                    inbox=topic_name(cfg, TESTING_INBOX), speed=cfg.testing_speed,
                    min_timeout_s=cfg.testing_min_timeout_s)


def _handle(state: Any, event: Any, record: Any, registry: Any, *, s: Settings):
    return handle(state, event, record, registry, s)


def build_app(cfg: Config, *, tick_s: float = 1.0, **overrides: Any):
    registry = faust_runtime.View(cfg, (DEVICES, TESTING_SAMPLES), registry_reader)
    handler = functools.partial(_handle, s=settings(cfg))
    return faust_runtime.build_app(cfg, PROCESS, INPUTS, handler, accepts=ACCEPTS,
                                   table="testing", view=registry,
                                   timers=[(tick_s, Ticker())], **overrides)


def run(cfg: Config) -> None:
    """Run the testing worker until SIGINT/SIGTERM; start more and they share the executions."""
    faust_runtime.run(build_app(cfg), cfg)
