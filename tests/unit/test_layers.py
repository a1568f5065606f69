"""The layer contracts of pyproject.toml ([tool.importlinter]) hold: api, projections, processors
and producers do not import each other, the kernel imports none of them, the API no Kafka client.

import-linter walks packages on disk, and the editable install maps `labbus.*` onto the checkout's
folders through an import hook it cannot walk, so the check runs on a copy laid out as installed.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("events", "producers", "processors", "projections", "api", "deploy")


def test_layer_contracts_hold(tmp_path):
    for layer in LAYERS:
        shutil.copytree(REPO / layer, tmp_path / "labbus" / layer,
                        ignore=shutil.ignore_patterns("__pycache__"))
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), str(REPO / "pyproject.toml"), "--no-cache"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
