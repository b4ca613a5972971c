"""A ``kvserve --data-dir`` subprocess for the durability tests, restarted and killed at will."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kvclient
from tests.conftest import read_listening_line


@dataclass
class DurableServer:
    """A ``kvserve --data-dir`` subprocess that can be stopped, killed and started again."""

    env: dict[str, str]
    data_dir: Path
    authkey: bytes
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    address: str = ""
    stderr: str = ""
    started: list[subprocess.Popen[str]] = field(default_factory=list)
    client_options: dict[str, Any] = field(default_factory=dict)

    def popen(self, *more: str) -> subprocess.Popen[str]:
        args = ["--port", "0", "--data-dir", str(self.data_dir), *self.extra, *more]
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvserve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            umask=0o022,  # the modes kvserve gives its files must not depend on the umask
        )
        self.started.append(proc)
        return proc

    def kill_all(self) -> None:
        """Kill every server this object started that still runs (teardown after a failure)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)

    def start(self, *more: str) -> DurableServer:
        self.proc = self.popen(*more)
        self.address = read_listening_line(self.proc)
        return self

    def refuses(self, *more: str) -> str:
        """Start, expect exit 3 before listening, return stderr."""
        proc = self.popen(*more)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # it started instead of refusing
            out, err = proc.communicate()
        assert (proc.returncode, out) == (3, ""), (proc.returncode, out, err)
        assert "Traceback" not in err
        return err

    def client(self) -> kvclient.Client:
        return kvclient.connect(self.address, self.authkey, **self.client_options)

    def wait(self) -> int:
        assert self.proc is not None
        _, err = self.proc.communicate(timeout=30)
        self.stderr += err
        return self.proc.returncode

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.wait()
