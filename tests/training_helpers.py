"""Shared by the training tests: run the CLI in a fresh process, read a run's metrics."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# One thread per process: the training tests start several processes, and on a small,
# shared CPU oversubscribed threads make each of them several times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-m", "soundstorm.engine.cli"]


def run_cli(*argv, check=True, timeout=300):
    r = subprocess.run(CLI + [str(a) for a in argv], capture_output=True, text=True,
                       env=ENV, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_losses(out):
    """step -> training loss, from a run's metrics.jsonl."""
    records = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
