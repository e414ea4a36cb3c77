"""A run that goes wrong: a non-finite loss or gradient norm stops it at that step before
any checkpoint of it is written; a newest checkpoint that does not load is skipped (with a
warning naming it and why) for the previous one; pruning keeps the checkpoint just
written."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from soundstorm.engine import Engine, ModelConfig, SoundStorm
from soundstorm.training import checkpoint as ckpt
from soundstorm.training import trainer
from soundstorm.training.checkpoint import list_checkpoints
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus

from training_helpers import cli, train_losses

# Training runs bitwise-reproducibly only with one thread per process.
pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--preset", "tiny", "--batch-size", 4, "--max-seconds", 1, "--min-seconds", 0.2,
          "--warmup-steps", 3, "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    write_synthetic_corpus(root / "train", 40, SyntheticSpec(min_seconds=0.3, max_seconds=1.5),
                           seed=0)
    return root / "train"


def names(out):
    return [p.name for p in list_checkpoints(out / "checkpoints")]


def test_a_nan_loss_stops_the_run_at_its_step_before_any_checkpoint(corpus, tmp_path,
                                                                   monkeypatch, capsys):
    real = trainer.masked_loss
    calls = {"n": 0}

    def poisoned(logits, batch):
        parts = real(logits, batch)
        calls["n"] += 1
        if calls["n"] == 7:            # one micro-batch a step: step 7
            parts.loss_sum = parts.loss_sum * float("nan")
        return parts

    monkeypatch.setattr(trainer, "masked_loss", poisoned)
    out = tmp_path / "run"
    # Logged every 20 steps, checkpointed every 5, one kept: a check at log steps only
    # would have written NaN checkpoints at steps 10 and 15 and pruned step 5.
    with pytest.raises(SystemExit) as e:
        cli("train", *COMMON, "--data", corpus, "--out", out, "--steps", 20, "--log-every", 20,
            "--checkpoint-every", 5, "--keep-checkpoints", 1)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "training diverged at step 7: loss nan (per level: " in err
    assert f"the newest is {out / 'checkpoints' / 'step-00000005'}" in err
    assert names(out) == ["step-00000005"]
    weights = load_file(out / "checkpoints" / "step-00000005" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    Engine(out / "checkpoints" / "step-00000005")


def test_an_infinite_gradient_norm_stops_the_run(corpus, tmp_path, monkeypatch, capsys):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def exploding(parameters, max_norm, *args, **kwargs):
        norm = real(parameters, max_norm, *args, **kwargs)
        calls["n"] += 1
        return torch.tensor(float("inf")) if calls["n"] == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", exploding)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        cli("train", *COMMON, "--data", corpus, "--out", out, "--steps", 10, "--log-every", 10,
            "--checkpoint-every", 2)
    err = capsys.readouterr().err
    assert "training diverged at step 3: loss " in err and "gradient norm inf" in err
    assert "loss nan" not in err
    assert names(out) == ["step-00000002"]


def _truncate_weights(path):
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return "not a readable safetensors file"


def _garbage_state(path):
    (path / "state.json").write_text("{\"step\": 10, ")
    return "not valid JSON"


def _nan_weights(path):
    w = path / "model.safetensors"
    tensors = load_file(w)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(w), metadata={"format": "soundstorm"})
    return f"tensor '{name}' holds"   # the loader's own finite check names the tensor


@pytest.mark.parametrize("breakage", [_truncate_weights, _garbage_state, _nan_weights])
def test_resume_falls_back_past_a_newest_checkpoint_that_does_not_load(corpus, tmp_path,
                                                                       capsys, breakage):
    out = tmp_path / "run"
    run = ["train", *COMMON, "--data", corpus, "--out", out, "--log-every", 1,
           "--checkpoint-every", 5, "--keep-checkpoints", 3]
    cli(*run, "--steps", 10)
    first = train_losses(out)
    broken = out / "checkpoints" / "step-00000010"
    reason = breakage(broken)
    capsys.readouterr()

    assert cli(*run, "--steps", 15) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {broken} does not load (" in err and reason in err, err
    # it resumed from step 5: steps 6-10 were trained again, exactly as the first time
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 16))
    assert all(losses[s] == first[s] for s in range(1, 11))
    assert names(out) == ["step-00000005", "step-00000010", "step-00000015"]
    assert (out / "checkpoints" / "step-00000010.broken").is_dir()   # kept, out of the way


def test_no_checkpoint_that_loads_is_an_error_naming_each(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    run = ["train", *COMMON, "--data", corpus, "--out", out, "--log-every", 5,
           "--checkpoint-every", 5, "--keep-checkpoints", 3]
    cli(*run, "--steps", 10)
    _garbage_state(out / "checkpoints" / "step-00000010")
    _truncate_weights(out / "checkpoints" / "step-00000005")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(*run, "--steps", 15)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "none of the 2 checkpoints in" in err
    assert "step-00000010: " in err and "step-00000005: " in err
    assert names(out) == ["step-00000005", "step-00000010"]       # nothing was moved


def _tiny_checkpoint(directory, step, keep):
    torch.manual_seed(step)
    model = SoundStorm(ModelConfig.preset("tiny"))
    return ckpt.save_checkpoint(directory, step, model, torch.optim.AdamW(model.parameters()),
                                {"data": {}}, keep=keep)


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    _tiny_checkpoint(tmp_path, 20, keep=3)
    _tiny_checkpoint(tmp_path, 30, keep=3)
    # A run resumed from step 20 (say, step 30 did not load) writes step 25: with one kept,
    # that is step 25 -- not step 30, the newest by number.
    _tiny_checkpoint(tmp_path, 25, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000025"]
    _tiny_checkpoint(tmp_path, 26, keep=2)
    _tiny_checkpoint(tmp_path, 40, keep=2)
    _tiny_checkpoint(tmp_path, 27, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000027", "step-00000040"]


def test_an_interrupted_same_step_rewrite_puts_the_old_copy_back(tmp_path):
    path = _tiny_checkpoint(tmp_path, 5, keep=2)
    # killed between moving the old copy aside and renaming the new one into place
    path.rename(tmp_path / "step-00000005.old.tmp")
    (tmp_path / "step-00000005.tmp").mkdir()
    ckpt.remove_partial(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000005"]
    assert json.loads((path / "state.json").read_text())["step"] == 5
