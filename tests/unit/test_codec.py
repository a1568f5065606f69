import io
import json
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from fastavro import parse_schema, schemaless_writer

from labbus.events import model as testing
from labbus.events.codec import (
    MAGIC,
    SCHEMAS_DIR,
    Codec,
    DecodeError,
    NotSingleObject,
    UnknownFingerprint,
    default_codec,
)
from labbus.events.model import (
    ENVELOPE_FIELDS,
    EVENT_TYPES,
    AccessDenied,
    Actor,
    AnomalyDetected,
    CommandAccepted,
    CommandCompleted,
    CommandDispatched,
    CommandFailed,
    CommandIssued,
    CommandProgress,
    CommandRejected,
    CommandStarted,
    CommandTimedOut,
    DeadLetter,
    DeviceHeartbeat,
    DeviceRegistered,
    DeviceRejected,
    DeviceSpecChanged,
    DeviceStatusChanged,
    ExperimentCancelled,
    ExperimentCancelRequested,
    ExperimentCompleted,
    ExperimentFailed,
    ExperimentRejected,
    ExperimentRequested,
    MeasurementRecorded,
    MeasurementRejected,
    MeasurementValidated,
    QuotaGranted,
    QuotaRefunded,
    QuotaReserved,
    RecipeRejected,
    RecipesProposed,
    RobotCommandExecuted,
    RobotRunFailed,
    RobotRunFinished,
    RobotRunRequested,
    RobotRunStarted,
    RoleGranted,
    RoleRevoked,
    UserDisabled,
    UserRegistered,
    WebhookDeadLettered,
    WebhookDelivered,
    WebhookDeliveryAttempted,
    WellColourMeasured,
    WellDispensed,
    WellScored,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

SAMPLES = [
    DeviceRegistered.create(source="s", subject="d1", sequence=1, device_id="d1",
                            device_type="thermometer", model="m", location="lab",
                            metrics=["temperature"], attributes={"a": "b"}),
    MeasurementRecorded.create(source="s", subject="d1", sequence=2, occurred_at=T0,
                               correlation_id=uuid.uuid4(), device_id="d1",
                               metric="temperature", value=21.25, unit="degC"),
    MeasurementValidated.create(source="v", subject="d1", sequence=2, causation_id=uuid.uuid4(),
                                    measurement_id=uuid.uuid4(), device_id="d1", metric="ph",
                                value=7.0, unit="pH", measured_at=T0, quality="suspect",
                                quality_rule="sequence"),
    MeasurementRejected.create(source="v", subject="d1", sequence=3, measurement_id=uuid.uuid4(),
                               device_id="d1", metric="ph", value=99.0, unit="pH",
                               measured_at=T0, reason_code="out_of_range", reason="too high"),
    DeadLetter.create(source="v", subject="t/0/1", sequence=1, source_topic="t",
                      source_partition=0, source_offset=1, original_key=b"k",
                      original_value=b"\x00\x01", error_type="corrupt_payload", error="bad",
                      failed_by="validator"),
]

_SPEC = {"metric": "temperature", "unit": "degC", "min": -20.0, "max": 150.0,
         "expected_interval_s": 0.2}
_CMD = dict(command_id="c-1", device_id="d1")
SAMPLES += [
    DeviceRegistered.create(source="gw", subject="d2", sequence=1, device_id="d2",
                            device_type="ph-meter", model="m", location="lab", metrics=["ph"],
                            specs=[_SPEC, dict(_SPEC, metric="ph", unit="pH", min=None, max=None)],
                            spec_version=3),
    DeviceSpecChanged.create(source="gw", subject="d2", sequence=2, device_id="d2",
                             spec_version=2, previous_specs=[_SPEC],
                             specs=[dict(_SPEC, max=200.0)]),
    DeviceHeartbeat.create(source="gw", subject="d2", sequence=3, device_id="d2", gateway="gw-0"),
    DeviceStatusChanged.create(source="gw", subject="d2", sequence=4, device_id="d2",
                               status="MAINTENANCE", reason="calibrating"),
    DeviceRejected.create(source="gw", subject="d3", sequence=0, device_id="d3", identity="d2",
                          rpc="/labbus.gateway.v1.Gateway/StreamData",
                          reason_code="identity_mismatch", reason="d2 may not act as d3",
                          peer="ipv4:127.0.0.1:5555"),
    CommandIssued.create(source="cli", subject="d1", sequence=1, idempotency_key="k-1",
                         command_type="tare", payload_json='{"x": 1}', expires_at=T0,
                         issued_by="operator", **_CMD),
    CommandDispatched.create(source="devices", subject="d1", sequence=0, idempotency_key="k-1",
                             command_type="tare", payload_json='{"x": 1}', expires_at=T0,
                             issued_by="operator", **_CMD),
    CommandAccepted.create(source="gw", subject="d1", sequence=2, **_CMD),
    CommandStarted.create(source="gw", subject="d1", sequence=3, progress=0.5, **_CMD),
    CommandProgress.create(source="sila", subject="d1", sequence=3, progress=0.7,
                           remaining_s=1.5, intermediate_json='{"CurrentTemperature": 31.0}',
                           **_CMD),
    CommandCompleted.create(source="gw", subject="d1", sequence=4, result_json="{}", **_CMD),
    CommandFailed.create(source="gw", subject="d1", sequence=5, error="jammed", **_CMD),
    CommandRejected.create(source="p", subject="d1", sequence=6, reason_code="offline",
                           reason="device d1 is offline", **_CMD),
    CommandTimedOut.create(source="p", subject="d1", sequence=7, expires_at=T0, **_CMD),
    AnomalyDetected.create(source="anomaly", subject="d1", sequence=8, device_id="d1",
                           metric="temperature", value=99.5, unit="degC", measured_at=T0,
                           measurement_id=uuid.UUID(int=7), rule="zscore", score=6.2,
                           threshold=4.0, window_mean=21.0, window_stddev=0.4, window_count=120),
]

_RECIPES = [{"well": "A1", "volumes": {"red": 60.0, "blue": 40.0}, "water_ul": 100.0},
            {"well": "B1", "volumes": {}, "water_ul": 200.0}]
_RUN = dict(run_id="r1", experiment_id="x1", iteration=0)
SAMPLES += [
    ExperimentRequested.create(source="cli", subject="x1", sequence=1, experiment_id="x1",
                               target_hex="#7a3cc0", target_lab=[40.5, 45.25, -55.0],
                               dyes=["red", "yellow", "blue"], budget_wells=96, batch_size=8,
                               tolerance_de=2.0, requested_by="me"),
    ExperimentRequested.create(source="cli", subject="x2", sequence=1, experiment_id="x2",
                               target_hex=None, target_lab=[50.0, 0.0, 0.0], dyes=["red"],
                               budget_wells=8, batch_size=1, tolerance_de=1.5, requested_by="me"),
    ExperimentRejected.create(source="p", subject="x1", sequence=1, experiment_id="x1",
                              reason="unknown dye(s) green"),
    RecipesProposed.create(source="p", subject="x1", sequence=2, experiment_id="x1", iteration=0,
                           recipes=_RECIPES, predicted_de=None, note="exploring"),
    RecipesProposed.create(source="p", subject="x1", sequence=3, experiment_id="x1", iteration=1,
                           recipes=_RECIPES[:1], predicted_de=1.25, note="model"),
    RecipeRejected.create(source="p", subject="x1", sequence=4, experiment_id="x1", iteration=1,
                          reasons=["A1: red 5 µL is below the p300 minimum 20 µL"]),
    RobotRunRequested.create(source="p", subject="x1", sequence=5, protocol_hash="ab" * 32,
                             protocol_text="def run(protocol): pass\n", recipes=_RECIPES, **_RUN),
    RobotRunStarted.create(source="ot2", subject="x1", sequence=1, mode="simulate", **_RUN),
    RobotCommandExecuted.create(source="ot2", subject="x1", sequence=2, command_id="c1",
                                command_key="k", command_type="aspirate",
                                params_json='{"volume": 60}',
                                result_json="{}", status="succeeded",
                                created_at="2026-01-02T03:04:05Z", started_at=None,
                                completed_at=None, error_json=None, index=3, **_RUN),
    WellDispensed.create(source="ot2", subject="x1", sequence=3, well="A1",
                         volumes={"red": 60.0, "water": 140.0}, **_RUN),
    RobotRunFinished.create(source="ot2", subject="x1", sequence=4, commands=91, wells=8, **_RUN),
    RobotRunFailed.create(source="ot2", subject="x1", sequence=5, error="tip collision", **_RUN),
    WellColourMeasured.create(source="reader", subject="x1", sequence=1, experiment_id="x1",
                              run_id="r1", iteration=0, well="A1", rgb=[120, 60, 190],
                              lab=[40.5, 45.25, -55.0], instrument_id="reader-1"),
    WellScored.create(source="p", subject="x1", sequence=6, experiment_id="x1", iteration=0,
                      well="A1", delta_e=3.5, volumes={"red": 60.0}, rgb=[1, 2, 3]),
    ExperimentCompleted.create(source="p", subject="x1", sequence=7, experiment_id="x1",
                               best_well="A1", best_volumes={"red": 60.0}, best_de=0.75,
                               wells_used=24, reason="confirmed"),
    ExperimentFailed.create(source="p", subject="x1", sequence=8, experiment_id="x1",
                            reason="budget spent", wells_used=96, best_de=None),
    ExperimentCancelRequested.create(source="cli", subject="x1", sequence=0, experiment_id="x1",
                                     reason="wrong dyes", requested_by="sam"),
    ExperimentCancelled.create(source="p", subject="x1", sequence=9, experiment_id="x1",
                               reason="wrong dyes", cancelled_by="sam", wells_used=16,
                               best_de=4.5),
    QuotaReserved.create(source="quota", subject="x1", sequence=1, experiment_id="x1",
                         user_id="u-1", wells=24, charged=True, remaining=176),
    QuotaRefunded.create(source="quota", subject="x1", sequence=2, experiment_id="x1",
                         user_id="u-1", wells=8, wells_used=16, charged=False, remaining=None),
]

_USER = dict(source="cli", subject="u-1", sequence=0, user_id="u-1")
SAMPLES += [
    UserRegistered.create(email="ada@lab.example", roles=["researcher", "viewer"],
                          registered_by="cli/root", **_USER),
    RoleGranted.create(role="admin", granted_by="cli/root", **_USER),
    RoleRevoked.create(role="viewer", revoked_by="cli/root", **_USER),
    UserDisabled.create(reason="left the lab", disabled_by="cli/root", **_USER),
    QuotaGranted.create(wells=96, granted_by="cli/root", note="term 1", **_USER),
    AccessDenied.create(permission="command:send", request="POST /commands",
                        reason="the roles ['student'] do not grant 'command:send'",
                        actor=Actor("u-1", ("student",), "10.0.0.9", "curl/8", "j"), **_USER),
]

# test protocols (issue 11)
_EID = "6f1c2b9e-3d4a-5b6c-8d7e-9f0a1b2c3d4e"
_EX = dict(source="testing", subject=_EID, sequence=3, correlation_id=uuid.UUID(_EID),
           execution_id=_EID, request_id="SR-1", sample_id="PV0001", protocol_id="PVTP-015",
           template_version=1)
_SR = dict(source="cli", subject="SR-1", sequence=1, request_id="SR-1")
SAMPLES += [
    testing.ServiceRequestSubmitted.create(
        customer="ACME", module_type="Canadian_Solar_Inc__CS6K_275M", module_area_m2=1.62,
        sample_ids=["PV0001", "PV0002"],
        protocols=[{"protocol_id": "PVTP-001", "version": None,
                    "inputs": {"rated_pmax_w": 275.0}},
                   {"protocol_id": "PVTP-015", "version": 1, "inputs": {}}],
        submitted_by="u-1", actor=Actor("u-1", ("engineer",)), **_SR),
    testing.ServiceRequestRejected.create(reasons=["unknown protocol: no protocol X"], **_SR),
    testing.SampleRegistered.create(
        source="gateway-http", subject="PV0001", sequence=1, sample_id="PV0001",
        lims_ref="LIMS-2026-00042", customer="ACME", module_type="Canadian_Solar_Inc__CS6K_275M",
        module_area_m2=1.62, serial_number="CS6K-1234567", registered_by="u-1",
        received_at=datetime(2026, 3, 1, 9, 30, tzinfo=UTC), actor=Actor("u-1", ("operator",))),
    testing.ExecutionAbortRequested.create(
        source="gateway-http", subject=_EID, sequence=0, execution_id=_EID,
        reason="chamber door open", requested_by="u-2", actor=Actor("u-2", ("engineer",))),
    testing.InspectionRecorded.create(sample_id="PV0001", inspector="u-2",
                                      findings=["scratched frame"], defects=[],
                                      photo_refs=["s3://photos/PV0001-front.jpg"], **_SR),
    testing.ProtocolAssigned.create(template_sha256="ab" * 32, inputs={"cycles": 200.0},
                                    module_type="Canadian_Solar_Inc__CS6K_275M",
                                    module_area_m2=1.62, **_EX),
    testing.ExecutionStarted.create(steps=["stc_initial", "thermal_cycling", "stc_final"],
                                    **_EX),
    testing.TestResultRecorded.create(
        source="cli", subject=_EID, sequence=1, execution_id=_EID, name="pmax_final_w",
        value=261.5, unit="W", entered_by="u-2"),
    testing.ExecutionAnalysed.create(results={"pmax_initial_w": 275.1}, units={
        "pmax_initial_w": "W"}, problems=["missing reading current of step stc_final"],
        readings={"stc_initial": {"voltage": [0.0, 18.5, 37.2], "current": [9.1, 8.9, 0.0]}},
        steps=[{"step_id": "stc_initial", "device_id": "pv-iv-1",
                "started_ms": 1_700_000_000_000, "finished_ms": 1_700_000_001_250}], **_EX),
    testing.QcEvaluated.create(verdict="fail", criteria=[
        {"id": "pmax_degradation", "description": "Pmax degradation", "clause": "7.2.3",
         "operator": "<=", "unit": "%", "value": 6.2, "limit": [5.0], "verdict": "fail",
         "message": "Pmax degradation: 6.2 %, limit <= 5 %: fail"},
        {"id": "low_extreme", "description": "low", "clause": "4.11", "operator": "between",
         "unit": "degC", "value": None, "limit": [], "verdict": "fail",
         "message": "cannot be judged"}], **_EX),
    testing.ExecutionPassed.create(**_EX),
    testing.ExecutionFailed.create(reason_code="timeout", reason="step stc_final: no "
                                   "completion within 30 s", **_EX),
    testing.NonConformanceRaised.create(nc_id=str(uuid.uuid4()), criteria=["pmax_degradation"],
                                        description="PV0001 failed PVTP-015", **_EX),
    testing.ServiceRequestCompleted.create(executions=6, passed=5, failed=1, verdict="fail",
                                           **_SR),
    testing.ReportGenerated.create(
        format="pdf", name="SR-1-report.pdf", content_type="application/pdf",
        sha256="cd" * 32, size=388_123, location="gridfs://labbus/artifacts/" + "cd" * 32,
        certificate=False, **_SR),
]


_HOOK = dict(source="webhooks.qms", subject="qms", target="qms",
             endpoint="https://qms.example/hooks", forwarded_event_id=uuid.uuid4(),
             forwarded_event_type="lab.quality.AnomalyDetected")
SAMPLES += [
    WebhookDeliveryAttempted.create(sequence=1, attempt=1, max_attempts=5, status_code=None,
                                    error="ConnectError: refused", duration_ms=1.5,
                                    retry_in_ms=750.0, **_HOOK),
    WebhookDeliveryAttempted.create(sequence=2, attempt=2, max_attempts=5, status_code=204,
                                    error=None, duration_ms=3.25, retry_in_ms=None, **_HOOK),
    WebhookDelivered.create(sequence=2, attempts=2, status_code=204, elapsed_ms=760.5, **_HOOK),
    WebhookDeadLettered.create(sequence=5, source_topic="lab.alerts", source_partition=1,
                               source_offset=42, attempts=5, last_status_code=503,
                               reason="HTTP 503", body='{"format":"labbus.webhook.v1"}', **_HOOK),
]


def test_every_schema_has_a_sample_and_an_event_class():
    codec = default_codec()
    assert {s.TYPE for s in SAMPLES} == set(codec.current) == set(EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.TYPE)
def test_round_trip(event):
    codec = default_codec()
    data = codec.encode(event)
    assert data[:2] == MAGIC
    assert data[2:10] == codec.schema(event.TYPE).fingerprint
    assert codec.decode(data) == event


def _crc64_avro_reference(text: str) -> bytes:
    """The reference algorithm printed in the Avro specification, little-endian as on the wire."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in text.encode():
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def test_fingerprint_is_the_spec_crc64_of_the_parsing_canonical_form():
    from fastavro.schema import to_parsing_canonical_form

    codec = default_codec()
    for entry in codec.current.values():
        canonical = to_parsing_canonical_form(entry.parsed)
        assert "logicalType" not in canonical and '{"type":"string"}' not in canonical
        assert entry.fingerprint == _crc64_avro_reference(canonical)


def test_fingerprint_agrees_with_apache_avro_on_schemas_without_logical_types():
    # apache-avro's Python canonical form keeps {"type":"string"} for logical types, against the
    # spec's [PRIMITIVES] rule (Java and fastavro write "string"); compare where that cannot differ.
    raw = {"type": "record", "name": "P", "namespace": "lab.x", "doc": "d", "fields": [
        {"name": "a", "type": "long"}, {"name": "b", "type": ["null", "string"], "default": None},
        {"name": "c", "type": {"type": "map", "values": "double"}}]}
    from labbus.events.codec import _load  # the codec's own schema loader

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.avsc"
        path.write_text(json.dumps(raw))
        _, _, fp, _ = _load(path)
    assert avro.schema.parse(json.dumps(raw)).fingerprint("CRC-64-AVRO") == fp


def test_envelope_fields_lead_every_schema():
    for path in SCHEMAS_DIR.glob("*.avsc"):
        names = [f["name"] for f in json.loads(path.read_text())["fields"]]
        assert tuple(names[: len(ENVELOPE_FIELDS)]) == ENVELOPE_FIELDS, path.name


def test_not_single_object():
    with pytest.raises(NotSingleObject):
        default_codec().decode(b"plain text")
    with pytest.raises(NotSingleObject):
        default_codec().decode(b"")


def test_unknown_fingerprint_is_a_decode_error_the_processor_dead_letters():
    with pytest.raises(UnknownFingerprint) as info:
        default_codec().decode(MAGIC + b"\x00" * 8 + b"\x02")
    assert isinstance(info.value, DecodeError)
    assert info.value.kind == "unknown_fingerprint"


def test_truncated_payload_is_a_decode_error():
    data = default_codec().encode(SAMPLES[1])
    with pytest.raises(DecodeError) as info:
        default_codec().decode(data[:20])
    assert info.value.kind == "corrupt_payload"


def test_data_written_with_a_previous_schema_version_still_decodes(tmp_path):
    """A v2 schema adds a field with a default; bytes written with v1 decode through v2."""
    schemas = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, schemas)
    name = "lab.measurement.MeasurementRecorded"
    v1 = json.loads((schemas / f"{name}.avsc").read_text())
    (schemas / "previous" / name / "v2.avsc").write_text(json.dumps(v1))
    v2 = dict(v1, fields=v1["fields"] + [{"name": "quality", "type": "string",
                                          "default": "unknown"}])
    v2["labbus.version"] = 3
    (schemas / f"{name}.avsc").write_text(json.dumps(v2))

    old_bytes = Codec().encode(SAMPLES[1])  # written by a producer still on v1
    new = Codec(schemas)
    kind, record = new.decode_record(old_bytes)
    assert kind == name and record["quality"] == "unknown" and record["value"] == 21.25
    assert record["schema_version"] == 2


def test_execution_analysed_v1_bytes_decode_with_no_readings():
    """Analyses written before they carried the readings (the kept v1) decode with readings {}
    and steps []; new bytes carry both."""
    v1_path = SCHEMAS_DIR / "previous" / testing.ExecutionAnalysed.TYPE / "v1.avsc"
    v1 = json.loads(v1_path.read_text())
    codec = default_codec()
    new = next(e for e in SAMPLES if isinstance(e, testing.ExecutionAnalysed))
    record = {f: getattr(new.envelope, f) for f in ENVELOPE_FIELDS}
    record["schema_version"] = 1
    for f in v1["fields"][len(record):]:
        record[f["name"]] = getattr(new, f["name"])
    buf = io.BytesIO()
    buf.write(MAGIC)
    (v1_entry,) = [e for e in codec.writers.values() if e.path == v1_path]
    buf.write(v1_entry.fingerprint)
    schemaless_writer(buf, parse_schema(v1), record)
    old = codec.decode(buf.getvalue())
    assert old.readings == {} and old.steps == [] and old.results == new.results
    back = codec.decode(codec.encode(new))
    assert back.readings["stc_initial"]["current"] == [9.1, 8.9, 0.0]
    assert back.steps[0]["device_id"] == "pv-iv-1" and back.envelope.schema_version == 2


def test_device_registered_v1_bytes_decode_through_v2_with_empty_specs():
    """Registrations written before measurement specs existed (the kept v1 schema) still decode:
    specs [] and spec_version 1, the defaults."""
    v1_path = SCHEMAS_DIR / "previous" / DeviceRegistered.TYPE / "v1.avsc"
    v1 = json.loads(v1_path.read_text())
    assert "specs" not in [f["name"] for f in v1["fields"]]
    codec = default_codec()
    old = SAMPLES[0]  # written by a v1 producer: no specs field on the wire
    record = {f: getattr(old.envelope, f) for f in ENVELOPE_FIELDS}
    record.update(schema_version=1, device_id="d1", device_type="thermometer", model="m",
                  location="lab", metrics=["temperature"], attributes={"a": "b"})
    buf = io.BytesIO()
    buf.write(MAGIC)
    (v1_entry,) = [e for e in codec.writers.values() if e.path == v1_path]
    buf.write(v1_entry.fingerprint)
    schemaless_writer(buf, parse_schema(v1), record)
    event = codec.decode(buf.getvalue())
    assert isinstance(event, DeviceRegistered)
    assert event.specs == [] and event.spec_version == 1
    assert event.metrics == ["temperature"] and event.envelope.schema_version == 1
    assert codec.schema(DeviceRegistered.TYPE).version == 3
    # and new bytes carry the specs
    new = codec.decode(codec.encode(SAMPLES[5]))
    assert new.specs[0]["max"] == 150.0 and new.specs[1]["min"] is None
    assert new.spec_version == 3


def test_measurement_validated_v1_bytes_decode_through_v2_without_quality():
    """Validated readings written before quality existed (the kept v1 schema) still decode:
    quality and quality_rule None, the defaults; new bytes carry them."""
    v1_path = SCHEMAS_DIR / "previous" / MeasurementValidated.TYPE / "v1.avsc"
    v1 = json.loads(v1_path.read_text())
    assert "quality" not in [f["name"] for f in v1["fields"]]
    codec = default_codec()
    old = SAMPLES[2]
    record = {f: getattr(old.envelope, f) for f in ENVELOPE_FIELDS}
    record.update(schema_version=1, measurement_id=old.measurement_id, device_id="d1",
                  metric="ph", value=7.0, unit="pH", measured_at=T0)
    buf = io.BytesIO()
    buf.write(MAGIC)
    (v1_entry,) = [e for e in codec.writers.values() if e.path == v1_path]
    buf.write(v1_entry.fingerprint)
    schemaless_writer(buf, parse_schema(v1), record)
    event = codec.decode(buf.getvalue())
    assert isinstance(event, MeasurementValidated) and event.value == 7.0
    assert event.quality is None and event.quality_rule is None
    assert event.envelope.schema_version == 1
    assert codec.schema(MeasurementValidated.TYPE).version == 3
    new = MeasurementValidated.create(
        source="v", subject="d1", sequence=2, measurement_id=uuid.uuid4(), device_id="d1",
        metric="ph", value=99.0, unit="pH", measured_at=T0, quality="bad", quality_rule="range")
    back = codec.decode(codec.encode(new))
    assert (back.quality, back.quality_rule) == ("bad", "range")
    # hot-path records are written with the current version, whatever they say
    _, plain = codec.decode_record(codec.encode(new), plain=True)
    again = codec.encode_plain(MeasurementValidated.TYPE, dict(plain, schema_version=0))
    assert codec.decode(again).envelope.schema_version == 3


def _compatible(reader: dict, writer: dict) -> bool:
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer)))
    return result.compatibility is SchemaCompatibilityType.compatible


def test_current_schemas_read_every_previous_version():
    """Fails when a changed schema in schemas/ cannot read data written with a kept version."""
    for previous in SCHEMAS_DIR.glob("previous/*/v*.avsc"):
        current = SCHEMAS_DIR / f"{previous.parent.name}.avsc"
        assert current.exists(), f"{previous} has no current schema"
        assert _compatible(json.loads(current.read_text()), json.loads(previous.read_text())), \
            f"{current.name} cannot read data written with {previous}"


def test_compatibility_checker_catches_a_breaking_change():
    schema = json.loads((SCHEMAS_DIR / "lab.measurement.MeasurementRecorded.avsc").read_text())
    added_without_default = dict(schema, fields=schema["fields"] + [{"name": "x", "type": "int"}])
    added_with_default = dict(schema, fields=schema["fields"] + [
        {"name": "x", "type": "int", "default": 0}])
    assert not _compatible(added_without_default, schema)
    assert _compatible(added_with_default, schema)


def test_other_avro_libraries_decode_our_bytes_with_only_the_avsc():
    """A downstream consumer: strip the 10-byte header, read with the .avsc (apache avro)."""
    import avro.io

    data = default_codec().encode(SAMPLES[1])
    schema = avro.schema.parse((SCHEMAS_DIR / f"{SAMPLES[1].TYPE}.avsc").read_text())
    record = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(data[10:])))
    assert record["metric"] == "temperature" and record["value"] == 21.25


def test_encoding_matches_plain_fastavro():
    codec = default_codec()
    event = SAMPLES[1]
    buf = io.BytesIO()
    raw = json.loads((SCHEMAS_DIR / f"{event.TYPE}.avsc").read_text())
    record = {f: getattr(event.envelope, f) for f in ENVELOPE_FIELDS}
    record.update(device_id="d1", metric="temperature", value=21.25, unit="degC")
    schemaless_writer(buf, parse_schema(raw), record)
    assert codec.encode(event)[10:] == buf.getvalue()


ACTOR = Actor("user-1", ("student",), "10.0.0.7", "curl/8.5", "jti-1")


def test_the_actor_round_trips_on_the_envelope():
    codec = default_codec()
    event = SAMPLES[1].with_envelope(actor=ACTOR)
    back = codec.decode(codec.encode(event))
    assert back == event and back.envelope.actor == ACTOR
    assert codec.decode(codec.encode(SAMPLES[1])).envelope.actor is None


def test_every_event_written_before_the_actor_existed_decodes_with_no_actor():
    """Schema evolution: each schema's kept version without `actor` (v1 for most) is a writer
    schema; its bytes decode through the current schema with actor None and their own version."""
    codec = default_codec()
    checked = set()
    for entry in codec.writers.values():
        raw = json.loads(entry.path.read_text())
        if "previous" not in entry.path.parts or "actor" in [f["name"] for f in raw["fields"]]:
            continue
        event = next(e for e in SAMPLES if e.TYPE == entry.name)
        record = {f: getattr(event.envelope, f) for f in ENVELOPE_FIELDS if f != "actor"}
        record["schema_version"] = entry.version
        for f in raw["fields"][len(record):]:
            record[f["name"]] = getattr(event, f["name"])
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(entry.fingerprint)
        schemaless_writer(buf, entry.parsed, record)
        back = codec.decode(buf.getvalue())
        assert back.envelope.actor is None and back.envelope.schema_version == entry.version
        assert back.envelope.event_id == event.envelope.event_id
        checked.add(entry.name)
    # schemas whose first version already had the actor (the test-protocol events: v2 of
    # ExecutionAnalysed added the readings, not the actor)
    first_has_actor = {e.name for e in codec.writers.values()
                       if "previous" in e.path.parts and e.path.name == "v1.avsc"
                       and "actor" in [f["name"] for f in json.loads(e.path.read_text())
                                       ["fields"]]}
    born_with_actor = {name for name, e in codec.current.items()
                       if e.version == 1 or name in first_has_actor}
    assert checked == set(codec.current) - born_with_actor, "a schema lost its pre-actor version"
    assert len(checked) >= 38


def test_other_avro_libraries_read_the_actor():
    import avro.io

    data = default_codec().encode(SAMPLES[1].with_envelope(actor=ACTOR))
    schema = avro.schema.parse((SCHEMAS_DIR / f"{SAMPLES[1].TYPE}.avsc").read_text())
    record = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(data[10:])))
    assert record["actor"] == {"user_id": "user-1", "roles": ["student"],
                               "client_ip": "10.0.0.7", "user_agent": "curl/8.5",
                               "token_id": "jti-1"}
