"""The gateway's pieces that need no services: stubs, certificates, ids, registration checks."""

from __future__ import annotations

import grpc
import pytest
from cryptography import x509

from labbus.events import pki
from labbus.producers.gateway import labbus_gateway_pb2 as pb
from labbus.producers.gateway import protos, server


def test_checked_in_stubs_are_what_the_proto_generates():
    assert protos.differing() == [], "run: python -m labbus.producers.gateway.protos"


def test_issued_certificates_name_the_device_and_its_role(tmp_path):
    pki.init_ca(tmp_path)
    cert_path, key_path = pki.issue_cert(tmp_path, "ph-7", role="device")
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    pem = cert_path.read_bytes()
    assert pki.identity_of_pem(pem) == pki.Identity("ph-7", "device")
    cert = x509.load_pem_x509_certificate(pem)
    ca = x509.load_pem_x509_certificate(pki.paths(tmp_path).ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert pki.issue_cert(tmp_path, "ph-7") == (cert_path, key_path)  # kept, not re-issued
    assert cert_path.read_bytes() == pem


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "-x", "x" * 129, "a b"])
def test_ids_that_cannot_be_devices_are_refused(tmp_path, bad):
    pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError):
        pki.issue_cert(tmp_path, bad)


def test_issuing_without_a_ca_says_what_to_run(tmp_path):
    with pytest.raises(pki.PkiError, match="labbus devices init-ca"):
        pki.issue_cert(tmp_path, "d1")


def test_event_ids_derive_from_device_and_sequence():
    assert server.reading_id("d1", 5) == server.reading_id("d1", 5)
    assert len({server.reading_id("d1", 5), server.reading_id("d1", 6),
                server.reading_id("d2", 5)}) == 3
    assert server.command_id_for("d1", "k") == server.command_id_for("d1", "k")
    assert server.command_id_for("d1", "k") != server.command_id_for("d2", "k")


def test_loopback_only_for_plain_text():
    assert all(server.is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.1.2.3"))
    assert not any(server.is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "example.org", "::"))


def _req(**spec) -> pb.RegisterDeviceRequest:
    s = dict(metric="ph", unit="pH", expected_interval_s=1.0)
    s.update(spec)
    return pb.RegisterDeviceRequest(device_id="d", device_type="ph-meter",
                                    specs=[pb.MeasurementSpec(**s)])


@pytest.mark.parametrize("spec, words", [
    (dict(expected_interval_s=0), "expected_interval_s must be a positive"),
    (dict(min=5.0, max=1.0), "min 5.0 is above max 1.0"),
    (dict(unit=""), "metric and unit are required"),
    (dict(max=float("inf")), "max must be finite"),
])
def test_registrations_with_bad_specs_are_refused_with_the_reason(spec, words):
    with pytest.raises(server.Refused) as info:
        server.check_registration(_req(**spec))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.reason


def test_a_good_registration_keeps_unbounded_ranges_unbounded():
    specs = server.check_registration(_req(min=0.0))
    assert specs == [{"metric": "ph", "unit": "pH", "min": 0.0, "max": None,
                      "expected_interval_s": 1.0}]


async def test_acks_follow_the_broker_in_stream_order_and_stop_at_a_refusal():
    import asyncio

    loop = asyncio.get_running_loop()
    entry = server.DeviceEntry("dev-1", "balance", "m", "lab", {}, [], 1)
    stream = server.DeviceStream("dev-1", None, asyncio.Semaphore(8),
                                 failed=loop.create_future(), entry=entry)
    futures = {seq: loop.create_future() for seq in (1, 2, 3, 4)}
    for seq, fut in futures.items():
        stream.pending.append((seq, fut, "t"))
        fut.add_done_callback(stream.delivered)

    def acks() -> list[list[int]]:
        out = []
        while not stream.out.empty():
            message, slots = stream.out.get_nowait()
            assert slots == len(message.ack.sequences)
            out.append(list(message.ack.sequences))
        return out

    futures[2].set_result(None)  # the broker acknowledged 2 before 1: nothing yet
    await asyncio.sleep(0)
    assert acks() == []
    futures[1].set_result(None)
    await asyncio.sleep(0)
    assert acks() == [[1, 2]] and entry.last_acked == 2
    futures[4].set_result(None)
    futures[3].set_exception(ConnectionError("broker gone"))
    await asyncio.sleep(0)
    assert acks() == []  # 3 was refused: neither it nor 4 behind it is acknowledged
    assert isinstance(stream.failed.result(), ConnectionError)
    assert [seq for seq, _, _ in stream.pending] == [3, 4]
