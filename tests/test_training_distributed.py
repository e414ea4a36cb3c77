"""torchrun + DistributedDataParallel on CPU (gloo): 2 processes reproduce 1 process with
the same global batch, and so does 1 process with 2 accumulation steps; the summary is
printed once, by rank 0."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from soundstorm.cli import main
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus

from training_helpers import ENV, free_port, train_losses

ARGS = ["--preset", "tiny", "--batch-size", 8, "--max-seconds", 1.2, "--min-seconds", 0.2,
        "--log-every", 1, "--steps", 8, "--warmup-steps", 2, "--checkpoint-every", 100,
        "--val-every", 4, "--no-progress", "--device", "cpu"]


def test_two_gloo_processes_match_one_process(tmp_path):
    spec = SyntheticSpec(min_seconds=0.3, max_seconds=1.5)
    write_synthetic_corpus(tmp_path / "train", 80, spec, seed=0)
    data = ["--data", tmp_path / "train", "--val-fraction", 0.1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # as in the torchrun processes (training_helpers.ENV)
    try:
        for out, extra in (("one", []), ("accum", ["--grad-accum", 2])):
            assert main([str(a) for a in ["train", *ARGS, *data, "--out", tmp_path / out,
                                          *extra]]) == 0
    finally:
        torch.set_num_threads(threads)
    port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "soundstorm.cli", "train", *map(str, ARGS), *map(str, data),
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("trained to step 8") == 1, r.stdout     # rank 0 alone reports
    one, two, accum = (train_losses(tmp_path / n) for n in ("one", "two", "accum"))
    assert sorted(one) == sorted(two) == sorted(accum) == list(range(1, 9))
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-6, abs=1e-7), s
        assert accum[s] == pytest.approx(one[s], rel=1e-6, abs=1e-7), s
    assert len(set(one.values())) == 8          # the losses do move
    w1 = load_file(tmp_path / "one" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    print("max relative loss difference, 2 processes vs 1:",
          max(abs(two[s] - one[s]) / one[s] for s in one),
          "; 2 accumulation steps vs 1:", max(abs(accum[s] - one[s]) / one[s] for s in one))
    # the validation loss is computed over all ranks' shares
    val = lambda n: [json.loads(l)["val_loss"] for l in
                     (tmp_path / n / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert val("two") == pytest.approx(val("one"), rel=1e-4)
