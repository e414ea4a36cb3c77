"""Shared by the training tests: run the CLI in a fresh process, read a run's metrics."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One thread per process: the training tests start several processes, and on a small,
# shared CPU oversubscribed threads make each of them several times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-m", "soundstorm.cli"]


def cli(*argv):
    """`soundstorm ARGV...` in this process; returns its exit status."""
    from soundstorm.cli import main

    return main([str(a) for a in argv])


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


def launch_ranks(argv, world_size=2, timeout=120):
    """Run `python argv...` as the `world_size` ranks of one launch, with the environment
    torchrun gives its processes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Unlike torchrun, a rank that fails does not stop the others, so each rank's own outcome
    shows. Returns [(returncode, stdout, stderr)] by rank. Ranks still running after
    `timeout` seconds are killed, with their process groups, and the test fails: the
    launch hung.
    """
    port = free_port()
    procs = []
    with tempfile.TemporaryDirectory() as logs:
        try:
            for rank in range(world_size):
                env = {**ENV, "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                out, err = (open(Path(logs) / f"{rank}.{n}", "w+") for n in ("out", "err"))
                proc = subprocess.Popen([sys.executable, *map(str, argv)], env=env,
                                        stdout=out, stderr=err, start_new_session=True)
                procs.append((proc, out, err))
            deadline = time.monotonic() + timeout
            hung = False
            for proc, _, _ in procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    hung = True
        finally:
            for proc, _, _ in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        results = []
        for proc, out, err in procs:
            out.seek(0)
            err.seek(0)
            results.append((proc.returncode, out.read(), err.read()))
            out.close()
            err.close()
    assert not hung, (f"the ranks were still running after {timeout} s (a hang); stderr tails:\n"
                      + "\n".join(f"rank {r}: {e[-2000:]}" for r, (_, _, e) in enumerate(results)))
    return results
