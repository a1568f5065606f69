"""Generate the gateway's Python stubs from labbus_gateway.proto (checked in next to it).

    python -m labbus.producers.gateway.protos          # rewrite the stubs
    python -m labbus.producers.gateway.protos --check  # exit 1 when they differ from the .proto

The .proto is compiled as `labbus/producers/gateway/labbus_gateway.proto`, so the generated
grpc module imports its messages as `labbus.producers.gateway.labbus_gateway_pb2`. The output
depends on the grpcio-tools version, which pyproject.toml pins for that reason.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "labbus_gateway.proto"
INSIDE = Path("labbus/producers/gateway")
OUTPUTS = ("labbus_gateway_pb2.py", "labbus_gateway_pb2.pyi", "labbus_gateway_pb2_grpc.py")


def generate() -> dict[str, str]:
    """{file name: text} of the stubs the .proto gives now."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        out = Path(tmp) / "out"
        (root / INSIDE).mkdir(parents=True)
        out.mkdir()
        shutil.copy(PROTO, root / INSIDE / PROTO.name)
        include = str(Path(protoc.__file__).parent / "_proto")
        code = protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{include}",
                            f"--python_out={out}", f"--pyi_out={out}",
                            f"--grpc_python_out={out}", str(INSIDE / PROTO.name)])
        if code != 0:
            raise RuntimeError(f"protoc failed ({code}) on {PROTO}")
        return {name: (out / INSIDE / name).read_text() for name in OUTPUTS}


def differing() -> list[str]:
    """Names of the checked-in stubs that differ from what the .proto gives."""
    fresh = generate()
    return [name for name, text in fresh.items()
            if not (HERE / name).exists() or (HERE / name).read_text() != text]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = differing()
        if bad:
            print("stale stubs (run python -m labbus.producers.gateway.protos): "
                  + ", ".join(bad), file=sys.stderr)
            return 1
        return 0
    for name, text in generate().items():
        (HERE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
