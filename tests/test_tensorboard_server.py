"""End-to-end: a real TensorBoard server serves the tags and the custom-scalars layout we write.

The server runs as a subprocess on a free loopback port and is always terminated (``_tensorboard.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _tensorboard import tensorboard_server
from torch.utils.tensorboard import SummaryWriter

from lightning_curvature.tensorboard import add_curvature_layout

RUN = "run1"
STEPS = list(range(0, 100, 10))
SHARPNESS = [float(np.float32(1.5 + 0.25 * i)) for i in range(len(STEPS))]
THRESHOLD = 40.0


pytestmark = pytest.mark.integration


def _write_log(logdir: Path) -> None:
    writer = SummaryWriter(str(logdir / RUN))
    add_curvature_layout(writer, k=3)
    for step, value in zip(STEPS, SHARPNESS):
        writer.add_scalar("curvature/sharpness", value, step)
        writer.add_scalar("curvature/stability_threshold", THRESHOLD, step)
    writer.close()


# "auto" uses the Rust data server shipped in tensorboard-data-server when present (what users get by
# default); "false" is the pure-Python loader used where that binary is unavailable.
@pytest.mark.parametrize("load_fast", ["auto", "false"], ids=lambda v: f"load_fast={v}")
def test_tensorboard_server_serves_curvature_tags_and_layout(tmp_path: Path, load_fast: str) -> None:
    logdir = tmp_path / "logs"
    _write_log(logdir)
    with tensorboard_server(logdir, tmp_path / "tensorboard.log", f"--load_fast={load_fast}") as server:
        tags = server.wait_for_tag(RUN, "curvature/stability_threshold")
        assert {"curvature/sharpness", "curvature/stability_threshold"} <= set(tags[RUN])

        points = server.get_json("/data/plugin/scalars/scalars", run=RUN, tag="curvature/sharpness")
        assert [p[1] for p in points] == STEPS  # [wall_time, step, value]
        assert [p[2] for p in points] == SHARPNESS

        layout = server.get_json("/data/plugin/custom_scalars/layout")
        categories = {c["title"]: c for c in layout["category"]}
        assert list(categories) == ["curvature", "grad_cov", "cdat"]
        charts = {c["title"]: c for c in categories["curvature"]["chart"]}
        sharp_chart = charts["sharpness vs stability threshold"]
        assert sharp_chart["multiline"]["tag"] == ["curvature/sharpness", "curvature/stability_threshold"]
