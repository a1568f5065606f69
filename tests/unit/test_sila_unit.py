"""The SiLA 2 bridge's parts that need no services: generated code, settings, the mapping of a
feature definition to measurement specs and commands, ids and partitions."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner

from labbus.events.devices import is_loopback, reading_id, registration_events
from labbus.producers.sila import bridge

REPO = Path(__file__).resolve().parents[2]
SILA = REPO / "producers" / "sila"


def test_generated_code_matches_the_feature_definition(tmp_path):
    """`make sila` output is checked in; regenerating from Thermostat.sila.xml changes nothing."""
    codegen = Path(sys.executable).parent / "sila2-codegen"
    subprocess.run([str(codegen), "generate-feature-files", "-o", str(tmp_path),
                    str(SILA / "Thermostat.sila.xml")], check=True, capture_output=True)
    fresh, kept = tmp_path / "thermostat", SILA / "generated" / "thermostat"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in kept.iterdir() if p.is_file() and p.suffix != ".pyc")
    match, mismatch, errors = filecmp.cmpfiles(fresh, kept, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with `make sila`: {mismatch + errors}"


def test_parse_server():
    assert bridge.parse_server("127.0.0.1:50052") == ("127.0.0.1", 50052)
    assert bridge.parse_server("[::1]:7") == ("::1", 7)
    for bad in ("localhost", "host:", ":80", "h:0", "h:70000", "h:x"):
        with pytest.raises(bridge.BridgeError, match="--server"):
            bridge.parse_server(bad)


def test_insecure_only_to_loopback(tmp_path):
    bridge.Settings("d", "127.0.0.1", 1, insecure=True).check()
    bridge.Settings("d", "localhost", 1, insecure=True).check()
    with pytest.raises(bridge.BridgeError, match="refusing --insecure to 10.0.0.7"):
        bridge.Settings("d", "10.0.0.7", 1, insecure=True).check()
    with pytest.raises(bridge.BridgeError, match="--ca .*no such file"):
        bridge.Settings("d", "10.0.0.7", 1, ca=tmp_path / "missing.pem").check()
    with pytest.raises(bridge.BridgeError, match="--heartbeat must be a positive"):
        bridge.Settings("d", "127.0.0.1", 1, insecure=True, heartbeat_s=0).check()


def test_specs_and_commands_from_the_feature_definition():
    """What the bridge derives from the Thermostat feature, on a client of a real server."""
    from sila2.client import SilaClient

    from labbus.producers.sila import thermostat
    from tests.conftest import free_port

    server, _ = thermostat.make_server("unit-sim", interval_s=0.2)
    port = free_port()
    thermostat.start(server, "127.0.0.1", port, insecure=True)
    try:
        client = SilaClient("127.0.0.1", port, insecure=True)
        d = bridge.describe(client, bridge.Settings("t1", "127.0.0.1", port, insecure=True,
                                                    expected_interval_s=0.5))
        client.close()
    finally:
        server.stop(0.1)
    assert d.specs == [
        {"metric": "Thermostat.CurrentTemperature", "unit": "degC", "min": -40.0, "max": 150.0,
         "expected_interval_s": 0.5},
        {"metric": "Thermostat.HeaterPower", "unit": "%", "min": 0.0, "max": 100.0,
         "expected_interval_s": 0.5}]
    assert d.commands["Thermostat.SetTemperature"] == bridge.SilaCommand(
        "Thermostat", "SetTemperature", True, ("TargetTemperature",))
    assert d.commands["Thermostat.Calibrate"].observable is False
    assert d.meta["device_type"] == "Thermostat"
    assert d.meta["attributes"]["sila_server_uuid"] == thermostat.server_uuid("unit-sim")


def test_insecure_simulator_only_on_loopback():
    from labbus.producers.sila import thermostat

    server, _ = thermostat.make_server("unit-sim-2")
    with pytest.raises(ValueError, match="refusing plain text on 0.0.0.0"):
        thermostat.start(server, "0.0.0.0", 1, insecure=True)


def test_partition_is_the_producers():
    """The bridge reads one partition of lab.devices / lab.commands: the one the kernel's
    producer (Kafka's default partitioner) writes the device's key to."""
    for key in ("thermo-1", "d", "x" * 50):
        assert bridge._partition(key, 6) == DefaultPartitioner()(key.encode(), list(range(6)),
                                                                 list(range(6)))
    assert len({bridge._partition(f"d{i}", 6) for i in range(100)}) == 6


def test_shared_device_helpers():
    assert reading_id("d", 1) == reading_id("d", 1) != reading_id("d", 2)
    assert is_loopback("::1") and not is_loopback("10.1.1.1")
    spec = {"metric": "m", "unit": "u", "min": None, "max": None, "expected_interval_s": 1.0}
    meta = dict(device_type="t", model="m", location="", attributes={})
    v1, first = registration_events(source="s", device_id="d", meta=meta, specs=[spec],
                                    known_specs=None, known_version=None)
    again = registration_events(source="s", device_id="d", meta=meta, specs=[spec],
                                known_specs=None, known_version=None)[1]
    assert v1 == 1 and [e.event_id for e in first] == [e.event_id for e in again]
    v2, changed = registration_events(source="s", device_id="d", meta=meta,
                                      specs=[dict(spec, unit="v")], known_specs=[spec],
                                      known_version=1)
    assert v2 == 2 and [e.TYPE.rsplit(".", 1)[1] for e in changed] == [
        "DeviceSpecChanged", "DeviceRegistered"]


def test_results_and_errors_as_text():
    from labbus.producers.sila.generated.thermostat import SetTemperature_Responses

    assert bridge._result_json(SetTemperature_Responses(ReachedTemperature=30.0)) == (
        '{"ReachedTemperature": 30.0}')
    assert bridge._sila_error(ValueError("x" * 3000)) == ("ValueError: " + "x" * 3000)[:2000]


