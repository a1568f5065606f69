"""labbus installs as one distribution: a wheel built with `python -m build`, installed into a
fresh virtualenv outside the checkout, imports as `labbus.*` and decodes events with the codec
and the schemas it ships. The build prints no packaging warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from labbus.events.codec import default_codec
from labbus.events.model import DeadLetter, MeasurementRecorded

REPO = Path(__file__).resolve().parents[2]

DECODE = """
import json, sys
from labbus.events.codec import SCHEMAS_DIR, default_codec
codec = default_codec()
out = []
for line in sys.stdin:
    name, record = codec.decode_record(bytes.fromhex(line.strip()), plain=True)
    out.append([name, record["event_id"], str(SCHEMAS_DIR)])
print(json.dumps(out))
"""


def test_a_wheel_installed_outside_the_checkout_decodes_events(tmp_path):
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    printed = build.stdout + build.stderr
    assert "Warning" not in printed and "deprecated" not in printed.lower(), printed[-3000:]
    wheel = next((tmp_path / "dist").glob("labbus-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=900, env=env)
    assert install.returncode == 0, install.stderr[-3000:]

    codec = default_codec()
    events = [MeasurementRecorded.create(source="t", subject="d1", sequence=1, device_id="d1",
                                         metric="pH", value=7.0, unit="pH"),
              DeadLetter.create(source="t", subject="x", sequence=1, source_topic="t",
                                source_partition=0, source_offset=1, original_key=None,
                                original_value=b"\x00", error_type="e", error="e",
                                failed_by="t")]
    lines = "\n".join(codec.encode(e).hex() for e in events)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    decoded = subprocess.run([str(python), "-I", "-c", DECODE], input=lines, cwd=outside,
                             capture_output=True, text=True, timeout=120, env=env)
    assert decoded.returncode == 0, decoded.stderr[-3000:]
    result = json.loads(decoded.stdout)
    assert [r[:2] for r in result] == [[e.TYPE, str(e.event_id)] for e in events]
    assert all(str(venv) in r[2] for r in result), "schemas not read from the installed wheel"

    cli = subprocess.run([str(venv / "bin" / "labbus"), "--help"], cwd=outside,
                         capture_output=True, text=True, timeout=120, env=env)
    assert cli.returncode == 0 and "services" in cli.stdout
