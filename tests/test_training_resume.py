"""Checkpoints: 20 steps straight == 10 steps, a SIGKILL, a resume, 10 more (bitwise, CPU
fp32, one thread per process: the condition the README states); every checkpoint left by
the kill loads; the exported model is what the engine loads."""

import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from soundstorm.engine import Engine
from soundstorm.cli import main
from soundstorm.training.checkpoint import list_checkpoints
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus

from training_helpers import CLI, ENV, run_cli, train_losses

COMMON = ["--preset", "tiny", "--batch-size", 4, "--max-seconds", 1, "--min-seconds", 0.2,
          "--log-every", 1, "--checkpoint-every", 10, "--val-every", 5, "--val-batches", 2,
          "--warmup-steps", 3, "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    spec = SyntheticSpec(min_seconds=0.3, max_seconds=1.5)
    write_synthetic_corpus(root / "train", 60, spec, seed=0)
    write_synthetic_corpus(root / "val", 8, spec, seed=1)
    return root


def test_kill_and_resume_reproduces_the_straight_run_bitwise(corpus, tmp_path):
    assert ENV["OMP_NUM_THREADS"] == "1"       # every process below runs one thread
    data = ["--data", corpus / "train", "--val-data", corpus / "val"]
    straight = tmp_path / "straight"
    run_cli("train", *COMMON, *data, "--out", straight, "--steps", 20)

    # The same run, killed (SIGKILL: no clean-up of any kind) once step 10 is checkpointed.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(CLI + [str(a) for a in ["train", *COMMON, *data, "--out", killed,
                                                    "--steps", 100000, "--keep-checkpoints", 1000]],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = killed / "checkpoints" / "step-00000010"
    deadline = time.monotonic() + 240
    while not (target / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    # Whatever the kill interrupted, every checkpoint under a final name is complete and
    # loads as a model.
    left = list_checkpoints(killed / "checkpoints")
    assert target in left
    for ckpt in left:
        Engine(ckpt)

    run_cli("train", *COMMON, *data, "--out", killed, "--steps", 20, "--resume", target)
    a, b = train_losses(straight), train_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]   # bitwise
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = load_file(straight / "checkpoints" / "step-00000020" / "optimizer.safetensors")
    ob = load_file(killed / "checkpoints" / "step-00000020" / "optimizer.safetensors")
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def test_auto_resume_continues_and_old_checkpoints_are_pruned(corpus, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _auto_resume(corpus, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _auto_resume(corpus, tmp_path, capsys):
    data = ["--data", corpus / "train"]
    out = tmp_path / "run"
    cli = lambda *argv: main([str(a) for a in argv])
    cli("train", *COMMON, *data, "--out", out, "--steps", 10, "--keep-checkpoints", 1)
    first = train_losses(out)
    capsys.readouterr()
    cli("train", *COMMON, *data, "--out", out, "--steps", 20, "--keep-checkpoints", 1)
    assert "trained to step 20" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000020"]
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 21))
    assert all(losses[s] == first[s] for s in range(1, 11))
    # the exported model and the last checkpoint are the same weights, and both decode
    w = load_file(out / "model" / "model.safetensors")
    c = load_file(out / "checkpoints" / "step-00000020" / "model.safetensors")
    assert all(torch.equal(w[k], c[k]) for k in w)
    tokens = Engine(out / "model").generate(torch.randint(0, 16, (2, 20)), seed=0)
    assert tokens.shape == (2, 40, 4) and (tokens >= 0).all() and (tokens < 32).all()
    assert (out / "curves.png").stat().st_size > 10_000

    with pytest.raises(SystemExit) as e:
        cli("train", *COMMON, *data, "--out", out, "--steps", 40, "--resume", "never")
    assert e.value.code == 2 and "already holds checkpoints" in capsys.readouterr().err
