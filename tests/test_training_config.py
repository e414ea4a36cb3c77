"""Training configuration, schedule, checkpoint atomicity and the CLI's checks: invalid
settings fail before any training work starts, with the setting named."""

import json
import subprocess
import sys

import pytest
import torch

from soundstorm.engine import ModelConfig, SoundStorm
from soundstorm.cli import main
from soundstorm.training import checkpoint as ckpt
from soundstorm.training.config import TrainConfig
from soundstorm.training.schedule import WarmupExponentialDecay
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus
from soundstorm.training.trainer import Trainer, TrainingSetupError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    write_synthetic_corpus(root / "c", 20, SyntheticSpec(min_seconds=0.3, max_seconds=1.0))
    return root / "c"


def test_presets_follow_the_paper():
    p = TrainConfig.preset("paper")
    assert (p.lr, p.weight_decay, p.warmup_steps, p.decay_steps, p.batch_size, p.max_seconds) == \
        (5e-4, 1e-3, 20_000, 500_000, 256, 30.0)
    assert p.model_config() == ModelConfig.preset("paper")
    assert TrainConfig.preset("tiny", lr=1e-2).lr == 1e-2


@pytest.mark.parametrize("changes,match", [
    ({"lr": 0}, "lr = 0: expected a number > 0"),
    ({"lr": float("nan")}, "lr = nan"),
    ({"batch_size": 0}, "batch_size = 0"),
    ({"steps": 2.5}, "steps = 2.5"),
    ({"max_seconds": 0.1, "min_seconds": 1.0}, "max_seconds = 0.1"),
    ({"decay_rate": 1.5}, "decay_rate = 1.5"),
    ({"dtype": "float16"}, "dtype = 'float16'"),
    ({"device": "tpu"}, "device = 'tpu'"),
    ({"on_bad_shard": "ignore"}, "on_bad_shard = 'ignore'"),
    ({"seed": -1}, "seed = -1"),
    ({"model": "huge"}, "unknown preset 'huge'"),
    ({"model_overrides": {"dim": 63}}, "dim .63. must be divisible by heads"),
    ({"val_fraction": 0.1, "val_data": "x"}, "either val_data or val_fraction"),
    ({"nonsense": 1}, "unknown training setting"),
    ({"level_weights": [1, 1]}, "level_weights must be 4 numbers >= 0"),
    ({"level_weights": [0, 0, 0, 0]}, "with a positive sum, got \\[0, 0, 0, 0\\]"),
    ({"level_weights_end": [1, 2, 3]}, "level_weights_end must be 4 numbers >= 0"),
    ({"level_weights_end": [1, -1, 0, 0]}, "level_weights_end must be 4 numbers >= 0"),
    ({"finer_full_mask": 1.5}, "finer_full_mask must be a number in \\[0, 1\\]"),
    ({"finer_full_mask": None}, "finer_full_mask must be a number in \\[0, 1\\]"),
    ({"join_utterances": 0}, "join_utterances = 0: expected an int >= 1"),
    ({"join_utterances": 2.0}, "join_utterances = 2.0: expected an int >= 1"),
])
def test_invalid_settings_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.preset("tiny", **changes)


def test_setup_checks_run_before_any_work(corpus, tmp_path):
    base = TrainConfig.preset("tiny", data=str(corpus), out=str(tmp_path / "r"))
    with pytest.raises(TrainingSetupError, match="divisible by processes x grad_accum = 1 x 3"):
        Trainer(base.replace(grad_accum=3))
    with pytest.raises(TrainingSetupError, match="num_quantizers: corpus 4, model 12"):
        Trainer(base.replace(model="small"))
    with pytest.raises(ValueError, match="larger than the 20 utterances"):
        Trainer(base.replace(batch_size=32))
    with pytest.raises(TrainingSetupError, match="needs a CUDA device"):
        Trainer(base.replace(dtype="bfloat16", device="cpu"))
    with pytest.raises(TrainingSetupError, match="data is not set"):
        Trainer(base.replace(data=None))
    with pytest.raises(ValueError, match="corpus directory not found"):
        Trainer(base.replace(data=str(tmp_path / "missing")))
    with pytest.raises(TrainingSetupError, match="not a complete checkpoint"):
        Trainer(base.replace(resume=str(tmp_path)))
    assert not (tmp_path / "r").exists()          # nothing was written


def test_schedule_warms_up_linearly_then_decays_exponentially():
    s = WarmupExponentialDecay(5e-4, 20_000, 500_000, 0.1)
    assert s.lr_at(1) == pytest.approx(5e-4 / 20_000)
    assert s.lr_at(10_000) == pytest.approx(2.5e-4)
    assert s.lr_at(20_000) == pytest.approx(5e-4)
    assert s.lr_at(520_000) == pytest.approx(5e-5)
    assert s.lr_at(270_000) == pytest.approx(5e-4 * 0.1 ** 0.5)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    for _ in range(3):
        lr = s.step(opt)
    assert opt.param_groups[0]["lr"] == lr == s.lr_at(3)
    t = WarmupExponentialDecay(5e-4, 20_000, 500_000, 0.1)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.last_step == 3


def test_an_interrupted_checkpoint_never_replaces_a_good_one(tmp_path, monkeypatch):
    model = SoundStorm(ModelConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 5, 4, dtype=torch.long),
          level=1).sum().backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {"x": 1}, keep=3)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, {"x": 2}, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert (tmp_path / "step-00000002.tmp").exists()
    ckpt.remove_partial(tmp_path)
    assert not (tmp_path / "step-00000002.tmp").exists()

    fresh = SoundStorm(ModelConfig.preset("tiny"))
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    state = ckpt.load_checkpoint(tmp_path / "step-00000001", fresh, fresh_opt)
    assert state["x"] == 1 and state["step"] == 1
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    assert sa["param_groups"] == sb["param_groups"]
    other = SoundStorm(ModelConfig.preset("tiny", dim=32))
    with pytest.raises(ValueError, match="different config .*'dim': \\(64, 32\\)"):
        ckpt.load_checkpoint(tmp_path / "step-00000001", other)


# -- CLI -------------------------------------------------------------------------------
def test_config_file_and_flags_take_precedence_in_order(tmp_path, corpus, capsys):
    from soundstorm.training.cli import build_train_config, train_parser
    (tmp_path / "c.yaml").write_text("lr: 0.01\nsteps: 7\nmodel_overrides:\n  depth: 1\n")
    args = train_parser().parse_args(["--preset", "tiny", "--config", str(tmp_path / "c.yaml"),
                                      "--steps", "9"])
    cfg = build_train_config(args)
    assert (cfg.lr, cfg.steps, cfg.model_config().depth) == (0.01, 9, 1)
    (tmp_path / "bad.json").write_text(json.dumps({"lr": 1e-3, "warmup": 5}))
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "tiny", "--config", str(tmp_path / "bad.json"),
              "--data", str(corpus), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "unknown training setting(s) ['warmup']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "r"),
              "--lr", "-1"])
    assert "lr = -1.0: expected a number > 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_config_file_that_is_not_utf8_or_too_deep_is_named(tmp_path, capsys):
    from soundstorm.training.config import load_config_file
    (tmp_path / "c.yaml").write_bytes(b"lr: 0.01\n# na\xefve\nsteps: 7\n")
    with pytest.raises(ValueError, match=r"c.yaml:2: not UTF-8 text \(byte 0xef\)"):
        load_config_file(tmp_path / "c.yaml")
    (tmp_path / "c.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="c.json: nested too deeply to be a mapping"):
        load_config_file(tmp_path / "c.json")
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "tiny", "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "c.yaml:2: not UTF-8 text" in err


def test_help_and_lazy_import(capsys):
    for cmd in ("train", "synthetic-corpus"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "example" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-c", "import sys, soundstorm.cli as c; "
                        "c.build_parser(); assert 'soundstorm.training' not in sys.modules"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_synthetic_corpus_command(tmp_path, capsys):
    assert main(["synthetic-corpus", str(tmp_path / "s"), "--utterances", "12",
                 "--val-utterances", "3"]) == 0
    from soundstorm.training.corpus import open_corpus
    assert len(open_corpus(tmp_path / "s" / "train")) == 12
    assert len(open_corpus(tmp_path / "s" / "val")) == 3
    with pytest.raises(SystemExit):
        main(["synthetic-corpus", str(tmp_path / "s")])
    assert "already holds a corpus" in capsys.readouterr().err


def test_finer_full_mask_is_stored_as_a_float():
    cfg = TrainConfig.preset("tiny", finer_full_mask=1)
    assert cfg.finer_full_mask == 1.0 and isinstance(cfg.finer_full_mask, float)
    assert TrainConfig.preset("tiny").finer_full_mask == 0.0
