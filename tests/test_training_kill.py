"""Training SIGKILLed at random moments, again and again: every checkpoint left loads, and
the run resumed after all the kills ends where a run never killed ends (the same losses at
every step and the same final weights, bitwise on CPU with one thread).

Starting Python and importing torch takes seconds, so each training process is forked from
a server process that imported everything once (the kill lands in training, not in
imports). The kill moments come from a seeded generator: a quarter fall in start-up (the
checkpoint being chosen, checked and loaded), the others after the process has trained a
step, anywhere in a step, a checkpoint being written or pruned, or the metrics being
appended.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from soundstorm.engine import SoundStorm
from soundstorm.training.checkpoint import list_checkpoints, load_checkpoint
from soundstorm.training.config import TrainConfig
from soundstorm.training.trainer import build_optimizer
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus

from training_helpers import ENV, train_losses

KILLS = 20
SEED = 20240611
ARGS = ["train", "--preset", "tiny", "--batch-size", "4", "--max-seconds", "1",
        "--min-seconds", "0.2", "--log-every", "1", "--checkpoint-every", "1",
        "--keep-checkpoints", "2", "--warmup-steps", "3", "--no-progress"]

# Reads one JSON request per line ({"argv": [...], "log": path}), forks a child that runs
# `soundstorm argv` with stdout and stderr in `log`, and answers with the child's pid and
# then, once the child is gone, its wait status.
SERVER = r"""
import json, os, sys, traceback
import torch
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
from soundstorm.cli import main
import soundstorm.training.cli, soundstorm.training.trainer
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])   # imports what the optimizer needs
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            code = main(request["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


class ForkServer:
    def __init__(self, logs):
        self.logs = logs
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", self.proc.stderr.read()[-3000:]

    def start(self, argv):
        """Fork a training process; returns (pid, its log file)."""
        self.count += 1
        log = self.logs / f"run-{self.count:03d}.log"
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log)})
                              + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline()), log

    def wait(self):
        """The wait status of the last process started."""
        return int(self.proc.stdout.readline())

    def run(self, argv):
        pid, log = self.start(argv)
        status = self.wait()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, log.read_text()[-3000:]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def newest_step(run):
    found = list_checkpoints(run / "checkpoints")
    return int(found[-1].name.split("-")[1]) if found else 0


def test_random_sigkills_leave_loadable_checkpoints_and_the_straight_runs_result(tmp_path):
    write_synthetic_corpus(tmp_path / "corpus", 40,
                           SyntheticSpec(min_seconds=0.3, max_seconds=1.5), seed=0)
    data = ["--data", tmp_path / "corpus"]
    killed = tmp_path / "killed"
    (tmp_path / "logs").mkdir()
    server = ForkServer(tmp_path / "logs")
    rng = random.Random(SEED)
    settings = TrainConfig.preset("tiny")
    config = settings.model_config()
    kills, attempts, finished = 0, 0, 0
    start = time.monotonic()
    try:
        while kills < KILLS:
            attempts += 1
            assert attempts <= 3 * KILLS, "the training processes kept ending before the kill"
            # A run that never ends by itself: each one is killed (or fails, and says why).
            before = newest_step(killed)
            pid, log = server.start([*ARGS, *data, "--out", killed, "--steps", 100_000])
            if rng.random() < 0.25:
                # during start-up: choosing and checking the checkpoint, loading it, ...
                time.sleep(rng.uniform(0.0, 1.0))
            else:
                # once a step is done: in a step, a checkpoint, pruning, the metrics
                deadline = time.monotonic() + 60
                while newest_step(killed) == before and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.5))
            os.kill(pid, signal.SIGKILL)
            status = server.wait()
            if os.WIFSIGNALED(status):
                kills += 1
            else:
                assert os.WEXITSTATUS(status) == 0, log.read_text()[-3000:]
                finished += 1
            # Whatever the kill interrupted: only complete checkpoints under final names,
            # and every one of them loads, with its optimizer state.
            assert not list(tmp_path.glob("killed/checkpoints/*.broken*"))
            for ckpt in list_checkpoints(killed / "checkpoints"):
                model = SoundStorm(config)
                load_checkpoint(ckpt, model, build_optimizer(model, settings),
                                restore_rng=False)
        steps = newest_step(killed) + 3
        assert steps >= 3 + KILLS // 2, f"only {steps - 3} steps were checkpointed"
        server.run([*ARGS, *data, "--out", killed, "--steps", steps])
        server.run([*ARGS, *data, "--out", tmp_path / "straight", "--steps", steps])
    finally:
        server.close()
    print(f"{kills} kills in {attempts} runs ({finished} ended first) over "
          f"{time.monotonic() - start:.1f} s; the resumed run reached step {steps}")

    a, b = train_losses(tmp_path / "straight"), train_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert [a[s] for s in a] == [b[s] for s in a]                      # bitwise
    wa = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    wb = load_file(killed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    name = f"step-{steps:08d}"
    oa = load_file(tmp_path / "straight" / "checkpoints" / name / "optimizer.safetensors")
    ob = load_file(killed / "checkpoints" / name / "optimizer.safetensors")
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
