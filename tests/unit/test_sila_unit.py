"""The SiLA 2 bridge's parts that need no services: generated code, settings, the mapping of a
feature definition to measurement specs and commands, ids and partitions."""

from __future__ import annotations

import collections
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner

from labbus.events.devices import is_loopback, key_partition, reading_id, registration_events
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


DESCRIBE = """
import json, sys
from labbus.producers.sila import bridge, thermostat
from sila2.client import SilaClient
port = int(sys.argv[1])
server, _ = thermostat.make_server("unit-sim", interval_s=0.2)
thermostat.start(server, "127.0.0.1", port, insecure=True)
try:
    client = SilaClient("127.0.0.1", port, insecure=True)
    d = bridge.describe(client, bridge.Settings("t1", "127.0.0.1", port, insecure=True,
                                                expected_interval_s=0.5))
    client.close()
finally:
    server.stop(0.1)
print(json.dumps({"specs": d.specs, "meta": d.meta, "uuid": thermostat.server_uuid("unit-sim"),
                  "commands": {k: [c.observable, list(c.parameters)]
                               for k, c in d.commands.items()}}))
"""


def test_specs_and_commands_from_the_feature_definition():
    """What the bridge derives from the Thermostat feature, on a client of a real server (in a
    subprocess: sila2 must not be imported here, see labbus.producers.sila)."""
    from tests.conftest import free_port

    out = subprocess.run([sys.executable, "-c", DESCRIBE, str(free_port())], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["specs"] == [
        {"metric": "Thermostat.CurrentTemperature", "unit": "degC", "min": -40.0, "max": 150.0,
         "expected_interval_s": 0.5},
        {"metric": "Thermostat.HeaterPower", "unit": "%", "min": 0.0, "max": 100.0,
         "expected_interval_s": 0.5}]
    assert d["commands"] == {"Thermostat.SetTemperature": [True, ["TargetTemperature"]],
                             "Thermostat.Calibrate": [False, ["ReferenceTemperature"]]}
    assert d["meta"]["device_type"] == "Thermostat"
    assert d["meta"]["attributes"]["sila_server_uuid"] == d["uuid"]


@pytest.mark.parametrize("args, message", [
    (["agent", "sila2-sim", "--host", "0.0.0.0", "--insecure"], "refusing plain text on 0.0.0.0"),
    (["agent", "sila2", "--server", "10.0.0.7:50052", "--device-id", "t", "--insecure"],
     "refusing --insecure to 10.0.0.7"),
    (["agent", "sila2", "--server", "10.0.0.7", "--device-id", "t"], "expected HOST:PORT"),
    (["agent", "sila2", "--server", "10.0.0.7:1", "--device-id", "t", "--ca", "/nonexistent"],
     "--ca /nonexistent: no such file"),
])
def test_bad_settings_are_refused_by_name(args, message, tmp_path):
    from labbus.deploy.demo import LABBUS

    out = subprocess.run([LABBUS, *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LABBUS_HOME": str(tmp_path)})
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_partition_is_the_producers():
    """Device agents read one partition of lab.devices / lab.commands: the one the kernel's
    producer (Kafka's default partitioner) writes the device's key to."""
    for key in ("thermo-1", "d", "x" * 50):
        assert key_partition(key, 6) == DefaultPartitioner()(key.encode(), list(range(6)),
                                                                 list(range(6)))
    assert len({key_partition(f"d{i}", 6) for i in range(100)}) == 6


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
    responses = collections.namedtuple("SetTemperature_Responses", "ReachedTemperature")
    assert bridge._result_json(responses(ReachedTemperature=30.0)) == (
        '{"ReachedTemperature": 30.0}')
    assert "sila2" not in sys.modules  # nothing here imported it
    assert bridge._sila_error(ValueError("x" * 3000)) == ("ValueError: " + "x" * 3000)[:2000]


