"""End-to-end: a real TensorBoard server serves the tags and the custom-scalars layout we write.

The server runs as a subprocess on a free loopback port and is always terminated.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_curvature.tensorboard import add_curvature_layout

HOST = "127.0.0.1"
RUN = "run1"
STEPS = list(range(0, 100, 10))
SHARPNESS = [float(np.float32(1.5 + 0.25 * i)) for i in range(len(STEPS))]
THRESHOLD = 40.0
READY_TIMEOUT_S = 60.0

# Bypass any http(s)_proxy from the environment: we only ever talk to loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _get_json(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with _OPENER.open(url, timeout=5) as resp:
        return json.loads(resp.read().decode("utf-8"))


def _write_log(logdir: Path) -> None:
    writer = SummaryWriter(str(logdir / RUN))
    add_curvature_layout(writer, k=3)
    for step, value in zip(STEPS, SHARPNESS):
        writer.add_scalar("curvature/sharpness", value, step)
        writer.add_scalar("curvature/stability_threshold", THRESHOLD, step)
    writer.close()


def _wait_until_loaded(proc: subprocess.Popen[bytes], base: str, log_path: Path) -> dict[str, Any]:
    """Poll the scalars index until our run shows up (the server loads logs asynchronously)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            tags = _get_json(base, "/data/plugin/scalars/tags")
            if RUN in tags and "curvature/stability_threshold" in tags[RUN]:
                return dict(tags)
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as err:
            last_error = err
        time.sleep(0.25)
    pytest.fail(
        f"tensorboard not ready after {READY_TIMEOUT_S:.0f}s (last error: {last_error!r}):\n"
        f"{log_path.read_text(errors='replace')}"
    )


# "auto" uses the Rust data server shipped in tensorboard-data-server when present (what users get by
# default); "false" is the pure-Python loader used where that binary is unavailable.
@pytest.mark.parametrize("load_fast", ["auto", "false"], ids=lambda v: f"load_fast={v}")
def test_tensorboard_server_serves_curvature_tags_and_layout(tmp_path: Path, load_fast: str) -> None:
    logdir = tmp_path / "logs"
    _write_log(logdir)
    port = _free_port()
    base = f"http://{HOST}:{port}"
    log_path = tmp_path / "tensorboard.log"
    cmd = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        HOST,
        "--port",
        str(port),
        "--reload_interval",
        "1",
        f"--load_fast={load_fast}",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            tags = _wait_until_loaded(proc, base, log_path)
            assert {"curvature/sharpness", "curvature/stability_threshold"} <= set(tags[RUN])

            points = _get_json(base, "/data/plugin/scalars/scalars", run=RUN, tag="curvature/sharpness")
            assert [p[1] for p in points] == STEPS  # [wall_time, step, value]
            assert [p[2] for p in points] == SHARPNESS

            layout = _get_json(base, "/data/plugin/custom_scalars/layout")
            categories = {c["title"]: c for c in layout["category"]}
            assert list(categories) == ["curvature", "grad_cov", "cdat"]
            charts = {c["title"]: c for c in categories["curvature"]["chart"]}
            sharp_chart = charts["sharpness vs stability threshold"]
            assert sharp_chart["multiline"]["tag"] == ["curvature/sharpness", "curvature/stability_threshold"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
