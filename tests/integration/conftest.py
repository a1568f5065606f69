"""Fixtures the gateway's integration tests share (test_gateway.py, test_gateway_kill.py)."""

from __future__ import annotations

import pytest

from tests.support.gateway import init_pki


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    """A device CA (with the gateway's certificate and an operator) for one test module."""
    return init_pki(tmp_path_factory.mktemp("pki"))
