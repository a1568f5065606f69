"""A simulated SiLA 2 thermostat (`labbus agent sila2-sim`): a real SiLA 2 server, built with the
`sila2` package on the code `sila2-codegen` generated from Thermostat.sila.xml.

- CurrentTemperature, HeaterPower: observable properties, updated every `interval_s`.
- SetTemperature(TargetTemperature): an observable command that ramps the block at RampRate,
  reporting progress, the estimated time left and the block temperature (intermediate
  responses); a target above the heater's limit (100 °C) fails with the defined execution error
  HeaterFault; one outside -20..120 °C is refused by SiLA's parameter validation.
- Calibrate(ReferenceTemperature): an unobservable command; a reference more than 5 K from the
  reading fails with CalibrationOutOfRange.

TLS by default, with a certificate from the labbus CA (LABBUS_PKI_DIR, `labbus devices init-ca`)
that carries the server UUID (SiLA 2's extension); plain text only on loopback.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

from labbus.producers.sila import load_sila2

load_sila2()

from sila2.server import (  # noqa: E402
    MetadataDict,
    ObservableCommandInstanceWithIntermediateResponses,
    SilaServer,
)

from labbus.events.devices import is_loopback  # noqa: E402
from labbus.producers.sila.generated.thermostat import (  # noqa: E402
    Calibrate_Responses,
    CalibrationOutOfRange,
    HeaterFault,
    SetTemperature_IntermediateResponses,
    SetTemperature_Responses,
    ThermostatBase,
    ThermostatFeature,
)

log = logging.getLogger(__name__)

HEATER_LIMIT_C = 100.0
AMBIENT_C = 21.0
SERVER_UUID_NAMESPACE = uuid.UUID("5b0c2a53-8a8e-4f2e-9f55-2a3c1d7e9b40")


def server_uuid(name: str) -> str:
    """A stable UUID per server name (the certificate carries it)."""
    return str(uuid.uuid5(SERVER_UUID_NAMESPACE, name))


class Thermostat(ThermostatBase):
    def __init__(self, parent_server: SilaServer, *, ramp_rate: float = 5.0,
                 interval_s: float = 0.5, seed: int = 0) -> None:
        super().__init__(parent_server=parent_server)
        self.ramp_rate = ramp_rate  # K/s
        self.interval_s = interval_s
        self.temperature = AMBIENT_C  # the block's true temperature
        self.offset = 0.0  # sensor offset (Calibrate)
        self.power = 0.0
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.stopped = threading.Event()
        self.executions = 0  # SetTemperature runs started (the tests' ground truth)
        self._publish()
        self.run_periodically(self._publish, interval_s)

    def reading(self) -> float:
        return round(self.temperature + self.offset + self.rng.gauss(0, 0.01), 3)

    def _publish(self) -> None:
        with self.lock:
            value, power = self.reading(), self.power
        self.update_CurrentTemperature(value)
        self.update_HeaterPower(power)

    def get_RampRate(self, *, metadata: MetadataDict) -> float:
        return self.ramp_rate

    def Calibrate(self, ReferenceTemperature: float, *,  # noqa: N803 - SiLA identifiers
                  metadata: MetadataDict) -> Calibrate_Responses:
        with self.lock:
            if abs(ReferenceTemperature - (self.temperature + self.offset)) > 5.0:
                raise CalibrationOutOfRange(
                    f"reference {ReferenceTemperature} °C is more than 5 K from the reading "
                    f"{self.temperature + self.offset:.2f} °C; the sensor needs service")
            self.offset = ReferenceTemperature - self.temperature
            return Calibrate_Responses(Offset=self.offset)

    def SetTemperature(
        self, TargetTemperature: float, *, metadata: MetadataDict,  # noqa: N803
        instance: ObservableCommandInstanceWithIntermediateResponses[
            SetTemperature_IntermediateResponses],
    ) -> SetTemperature_Responses:
        self.executions += 1
        log.info("SetTemperature executing", extra={"target": TargetTemperature,
                                                    "execution": self.executions})
        if TargetTemperature > HEATER_LIMIT_C:
            raise HeaterFault(f"target {TargetTemperature} °C is above the heater's limit of "
                              f"{HEATER_LIMIT_C} °C")
        instance.begin_execution()
        start = self.temperature
        span = abs(TargetTemperature - start) or 1e-9
        step_s = 0.1
        while not self.stopped.is_set():
            with self.lock:
                gap = TargetTemperature - self.temperature
                move = max(-self.ramp_rate * step_s, min(self.ramp_rate * step_s, gap))
                self.temperature += move
                self.power = 100.0 if move > 0 else 0.0
                done = abs(TargetTemperature - self.temperature) < 1e-9
                current = self.temperature + self.offset
            instance.progress = min(1.0, 1.0 - abs(TargetTemperature - self.temperature) / span)
            instance.estimated_remaining_time = timedelta(
                seconds=abs(TargetTemperature - self.temperature) / self.ramp_rate)
            instance.send_intermediate_response(
                SetTemperature_IntermediateResponses(CurrentTemperature=round(current, 3)))
            if done:
                break
            time.sleep(step_s)
        with self.lock:
            self.power = 10.0 if self.temperature > AMBIENT_C else 0.0
            reached = self.temperature + self.offset
        return SetTemperature_Responses(ReachedTemperature=round(reached, 3))

    def stop(self) -> None:
        self.stopped.set()
        super().stop()


def make_server(name: str = "thermostat-sim", *, ramp_rate: float = 5.0,
                interval_s: float = 0.5) -> tuple[SilaServer, Thermostat]:
    server = SilaServer(server_name=name, server_type="Thermostat",
                        server_description="A simulated heated block (labbus)",
                        server_version="1.0", server_vendor_url="https://github.com/labbus",
                        server_uuid=server_uuid(name))
    impl = Thermostat(server, ramp_rate=ramp_rate, interval_s=interval_s)
    server.set_feature_implementation(ThermostatFeature, impl)
    return server, impl


def start(server: SilaServer, host: str, port: int, *, insecure: bool = False,
          pki_dir: Path | None = None, cert: Path | None = None, key: Path | None = None,
          name: str = "thermostat-sim") -> None:
    """Serve on host:port: TLS with `cert`/`key`, or a certificate from the labbus CA in
    `pki_dir` issued now; plain text only on loopback. No SiLA discovery broadcast."""
    if insecure:
        if not is_loopback(host):
            raise ValueError(f"refusing plain text on {host}: --insecure is allowed only on a "
                             "loopback address (127.0.0.1, ::1, localhost)")
        server.start_insecure(host, port, enable_discovery=False)
        return
    if (cert is None) != (key is None):
        raise ValueError("give both --cert and --key, or neither (a certificate from the labbus "
                         "CA is then issued)")
    if cert is None:
        from labbus.events import pki

        hosts = () if host in ("0.0.0.0", "::", "") else (host,)
        cert, key = pki.issue_sila_server_cert(pki_dir, name, server_uuid(name), hosts)
    server.start(host, port, private_key=Path(key).read_bytes(),
                 cert_chain=Path(cert).read_bytes(), enable_discovery=False)
