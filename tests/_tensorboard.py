"""A real TensorBoard server for end-to-end tests: a subprocess on a free loopback port, always terminated."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0

# Bypass any http(s)_proxy from the environment: we only ever talk to loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class TensorBoardServer:
    """The running server: JSON endpoints and a wait for a run's tag to be loaded."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str, log_path: Path) -> None:
        self.proc, self.base, self.log_path = proc, base, log_path

    def get_json(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with _OPENER.open(url, timeout=5) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def wait_for_tag(self, run: str, tag: str) -> dict[str, Any]:
        """Poll the scalars index until ``run`` has ``tag`` (the server loads logs asynchronously); all its tags."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {self.proc.returncode}:\n{self._log()}")
            try:
                tags = self.get_json("/data/plugin/scalars/tags")
                if run in tags and tag in tags[run]:
                    return dict(tags)
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as err:
                last_error = err
            time.sleep(0.25)
        pytest.fail(f"tensorboard not ready after {READY_TIMEOUT_S:.0f}s (last error: {last_error!r}):\n{self._log()}")

    def _log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def tensorboard_server(logdir: Path, log_path: Path, *extra_args: str) -> Iterator[TensorBoardServer]:
    """``python -m tensorboard.main --logdir logdir`` on a free port, its output in ``log_path``."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST,
           "--port", str(port), "--reload_interval", "1", *extra_args]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield TensorBoardServer(proc, f"http://{HOST}:{port}", log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
