"""SiLA 2: the bridge (`labbus agent sila2`) and a simulated thermostat (`labbus agent sila2-sim`).

The `sila2` package (0.14) needs protobuf's pure-Python implementation: it compiles each
feature's .proto at run time and adds `SiLAFramework.proto` to protobuf's pool more than once,
which the default implementation (upb) refuses ("duplicate file name"). `import sila2` selects
it by setting PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python in os.environ, which works only
before protobuf is first imported, and the variable then holds for the process's children too.
So sila2 is imported only by the processes that speak SiLA (the bridge, the simulator), first,
through `load_sila2()`; other labbus processes (the gateway: protobuf on its hot path) never
import it, and tests run SiLA code in subprocesses.
"""

from __future__ import annotations

import sys


def load_sila2() -> None:
    """Import sila2, or say clearly why it cannot work in this process."""
    if "sila2" in sys.modules:
        return
    if "google.protobuf" in sys.modules:
        from google.protobuf.internal import api_implementation

        if api_implementation.Type() != "python":
            raise RuntimeError(
                "sila2 needs protobuf's pure-Python implementation, but protobuf was imported "
                f"first with {api_implementation.Type()!r}: import labbus.producers.sila.* "
                "before anything that uses protobuf, or set "
                "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python")
    import sila2  # noqa: F401
