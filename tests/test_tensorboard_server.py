"""The real viewer: `tensorboard --logdir <run>` serves the scalar tags of a training run over its HTTP data API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import cli_env, free_port, train


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_the_scalar_tags(tmp_outputs: Path) -> None:
    run_dir = tmp_outputs / "run"
    train(run_dir, "debug=fast", "monitor=none")
    port = free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [str(tensorboard), "--logdir", str(run_dir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        tags, deadline = {}, time.monotonic() + 90
        while time.monotonic() < deadline and server.poll() is None:
            try:  # {run: {tag: {...}}} once the server is up and has read the event file
                tags = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
                if tags.get("tensorboard"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr"} <= set(tags.get("tensorboard", {})), (
            tags
        )
        runs = get_json(f"http://127.0.0.1:{port}/data/runs")
        assert runs == ["tensorboard"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
