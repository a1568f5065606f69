"""A labbus process a test starts, kills with SIGKILL and restarts."""

from __future__ import annotations

import signal
import subprocess


class Restartable:
    proc: subprocess.Popen | None = None
    stop_timeout_s: float = 15

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
