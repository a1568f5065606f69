"""Opentrons OT-2 producer: in-process simulation and the robot's HTTP API.

The protocol text itself is generated in the kernel (``labbus.events.ot2_protocol``, from the
recipes, the labware rulebook and the deck layout) and reaches the agent in RobotRunRequested.

* ``simulate``   - run that text on opentrons' Protocol Engine, streaming each command as it
                   completes (the only module that imports opentrons; import it explicitly).
* ``robot_http`` - same, on a real OT-2 via its HTTP API on port 31950 (httpx).
* ``commands``   - the shared plain-dict command shape and helpers (``dispensed_wells``...).

Importing this package does not import opentrons (slow, and it reads its config dir once).
"""

from .commands import (
    COMMAND_KEYS,
    RunOutcome,
    dispensed_wells,
    find_labware_id,
    labware_ids,
    liquid_sources,
    normalize_command,
)

__all__ = [
    "COMMAND_KEYS", "RunOutcome", "dispensed_wells", "find_labware_id", "labware_ids",
    "liquid_sources", "normalize_command",
]
