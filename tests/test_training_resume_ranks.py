"""Resuming a multi-process run: rank 0 alone chooses the checkpoint and broadcasts its
step; every rank loads exactly that one, or every rank stops with an error (no hang).

Each test starts 2 CPU (gloo) ranks of this file run as a script (the block at the end):
each rank patches its own view of the file system as a test needs, then runs the code
under test. Ranks that would wait on each other forever are killed after a timeout, and
the test fails.
"""

import contextlib
import json
import pathlib
import shutil
import sys
from unittest import mock

import pytest
import torch

from soundstorm.cli import main
from soundstorm.training import checkpoint, trainer
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus

from training_helpers import launch_ranks, train_losses

ARGS = ["--preset", "tiny", "--batch-size", 4, "--max-seconds", 1, "--min-seconds", 0.2,
        "--log-every", 1, "--checkpoint-every", 2, "--keep-checkpoints", 10,
        "--warmup-steps", 2, "--no-progress", "--device", "cpu"]
TIMEOUT = 120   # seconds for one 2-rank launch; a hang fails the test


# -- each rank's own view of the file system (patched on rank 1) ------------------------
@contextlib.contextmanager
def listing_adds(extra):
    """Listing a checkpoint directory also finds the checkpoints `extra` (a list of paths),
    as a directory read on another node, or at another moment, might."""
    real = checkpoint.list_checkpoints

    def patched(directory):
        found = real(directory) + [pathlib.Path(p) for p in extra]
        return sorted(found, key=lambda p: p.name)

    with mock.patch.object(checkpoint, "list_checkpoints", patched), \
            mock.patch.object(trainer, "list_checkpoints", patched):
        yield


@contextlib.contextmanager
def listing_finds_nothing():
    with mock.patch.object(checkpoint, "list_checkpoints", lambda directory: []), \
            mock.patch.object(trainer, "list_checkpoints", lambda directory: []):
        yield


@contextlib.contextmanager
def unreadable(ckpt):
    """Reading checkpoint `ckpt`'s state.json fails with a permission error."""
    real = pathlib.Path.read_text
    target = pathlib.Path(ckpt) / checkpoint.STATE_FILE

    def patched(self, *args, **kwargs):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    with mock.patch.object(pathlib.Path, "read_text", patched):
        yield


def _fake_checkpoint(path, step):
    """Enough of a checkpoint for choosing one: a state.json with its step."""
    path.mkdir(parents=True)
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    return path


# -- the tests ------------------------------------------------------------------------
def test_rank_0_decides_and_every_rank_gets_its_decision(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(run / "step-00000010", 10)
    newer = _fake_checkpoint(tmp_path / "elsewhere" / "step-00000020", 20)
    (tmp_path / "empty").mkdir()
    results = launch_ranks([__file__, "decide", tmp_path], timeout=TIMEOUT)
    views = []
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
        views.append(json.loads(out.splitlines()[-1]))
    zero, one = views
    # the ranks' own views disagree ...
    assert zero["own_auto"] == 10 and one["own_auto"] == 20
    # ... and both take rank 0's decision
    for v in views:
        assert v["auto"] == [str(run / "step-00000010"), 10]
        assert v["auto_empty"] is None                 # rank 1 alone sees a checkpoint there
        assert v["explicit"] == [str(newer), 20]
    # rank 0 alone cannot use resume = 'never' (it sees a checkpoint): both ranks stop
    assert "already holds checkpoints and resume = 'never'" in zero["never"]
    assert "rank 1: rank 0 could not choose a checkpoint to resume from" in one["never"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 1-process run of 6 steps with checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("ranks")
    write_synthetic_corpus(root / "train", 40, SyntheticSpec(min_seconds=0.3, max_seconds=1.5),
                           seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # as in the launched ranks (training_helpers.ENV)
    try:
        assert main([str(a) for a in ["train", *ARGS, "--data", root / "train",
                                      "--out", root / "one", "--steps", 6]]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def _resume_dir(reference, tmp_path):
    """A run directory holding only the reference's step-2 checkpoint."""
    out = tmp_path / "two"
    shutil.copytree(reference / "one" / "checkpoints" / "step-00000002",
                    out / "checkpoints" / "step-00000002")
    return out


def test_ranks_that_see_different_checkpoints_resume_from_rank_0s(reference, tmp_path):
    out = _resume_dir(reference, tmp_path)
    # rank 1 also sees a newer, complete checkpoint that rank 0 does not
    newer = tmp_path / "elsewhere" / "step-00000004"
    shutil.copytree(reference / "one" / "checkpoints" / "step-00000004", newer)
    results = launch_ranks([__file__, "train", "newer-on-rank-1", newer, "train", *ARGS,
                            "--data", reference / "train", "--out", out, "--steps", 6],
                           timeout=TIMEOUT)
    chosen = out / "checkpoints" / "step-00000002"
    for rank, (code, stdout, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
        assert f"rank {rank} loads {chosen}\n" in stdout
    # and the run continues as the 1-process run did from step 2
    one, two = train_losses(reference / "one"), train_losses(out)
    assert sorted(two) == [3, 4, 5, 6]
    for s in two:
        assert two[s] == pytest.approx(one[s], rel=1e-6, abs=1e-7), s


def test_a_rank_that_cannot_read_the_chosen_checkpoint_stops_every_rank(reference, tmp_path):
    out = _resume_dir(reference, tmp_path)
    chosen = out / "checkpoints" / "step-00000002"
    results = launch_ranks([__file__, "train", "unreadable-on-rank-1", chosen, "train", *ARGS,
                            "--data", reference / "train", "--out", out, "--steps", 6],
                           timeout=TIMEOUT)
    (code0, _, err0), (code1, _, err1) = results
    assert code0 != 0 and code1 != 0
    assert (f"rank 1 cannot resume from checkpoint {chosen} (step 2, chosen by rank 0): "
            in err1) and "Permission denied" in err1, err1[-3000:]
    assert (f"rank 0: rank(s) 1 cannot resume from checkpoint {chosen} (step 2, chosen by "
            "rank 0); their errors say why" in err0), err0[-3000:]
    assert not (out / "checkpoints" / "step-00000004").exists()   # no step was trained


# -- what each rank runs ----------------------------------------------------------------
def _decide(root):
    """Print this rank's own choices and the decisions it received, as one JSON line."""
    from soundstorm.training import distributed as dist_utils

    info = dist_utils.setup("cpu")
    run = root / "run" / "checkpoints"
    elsewhere = [root / "elsewhere" / "step-00000020"]
    view = listing_adds(elsewhere) if info.rank == 1 else contextlib.nullcontext()
    report = {}
    try:
        with view:
            report["own_auto"] = trainer.choose_resume("auto", run)
            for key, mode, directory in (("auto", "auto", run),
                                         ("auto_empty", "auto", root / "empty"),
                                         ("explicit", str(elsewhere[0]), run)):
                found = trainer.agree_on_resume(mode, directory, info)
                report[key] = None if found is None else [str(found[0]), found[1]]
        with listing_finds_nothing() if info.rank == 1 else contextlib.nullcontext():
            try:
                trainer.agree_on_resume("never", run, info)
                report["never"] = "no error"
            except trainer.TrainingSetupError as e:
                report["never"] = str(e)
        dist_utils.barrier(info)
    finally:
        dist_utils.teardown(info)
    print(json.dumps(report))


def _train(scenario, path, argv):
    """Run `soundstorm train argv` on this rank, its view of the files patched as
    `scenario` says (on rank 1), printing which checkpoint it loads."""
    import os

    rank = int(os.environ["RANK"])
    real_load = checkpoint.load_checkpoint

    def load(ckpt, *args, **kwargs):
        print(f"rank {rank} loads {ckpt}", flush=True)
        return real_load(ckpt, *args, **kwargs)

    views = {"newer-on-rank-1": lambda: listing_adds([path]),
             "unreadable-on-rank-1": lambda: unreadable(path)}
    view = views[scenario]() if rank == 1 else contextlib.nullcontext()
    with view, mock.patch.object(checkpoint, "load_checkpoint", load), \
            mock.patch.object(trainer, "load_checkpoint", load):
        return main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "decide":
        _decide(pathlib.Path(sys.argv[2]))
    else:
        sys.exit(_train(sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4:]))
