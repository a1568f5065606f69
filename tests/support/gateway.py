"""The gRPC gateway as the integration tests run it: `labbus gateway grpc` started as a user
starts it (a subprocess, on a free port, with the tests' device CA), waited for until its health
service says SERVING, and stopped or killed with SIGKILL."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from labbus.deploy.demo import LABBUS
from labbus.events import pki
from labbus.producers.gateway import devices as dev
from tests.conftest import REPO, free_port
from tests.support.process import Restartable

OPERATOR = "operator-1"


def init_pki(root: Path) -> Path:
    """A device CA with the gateway's certificate and an operator (`OPERATOR`), in `root`."""
    pki.init_ca(root)
    pki.issue_cert(root, OPERATOR, role="operator")
    return root


class Gateway(Restartable):
    def __init__(self, env: dict, pki_dir, logdir, port: int | None = None) -> None:
        self.env = {**env, "LABBUS_PKI_DIR": str(pki_dir)}
        self.pki_dir = pki_dir
        self.port = port or free_port()
        self.logdir = logdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = open(self.logdir / f"gateway-{self.port}-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [LABBUS, "gateway", "grpc", "--port", str(self.port), "--metrics-port", "-1"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.wait_serving()

    def wait_serving(self, timeout: float = 30) -> None:
        creds = dev.credentials(self.pki_dir, OPERATOR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"gateway exited {self.proc.returncode}"
            with grpc.secure_channel(self.target, creds) as ch:
                try:
                    r = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service="labbus.gateway.v1.Gateway"),
                        timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        raise AssertionError("gateway not SERVING")
