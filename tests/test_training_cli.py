"""The `soundstorm train` command line: fine-tuning from a model directory, model size
flags, the preset flags, resuming only on the same data, one train_config per invocation,
"nothing to do", and the progress flags every training command shares."""

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from soundstorm.engine import SoundStorm
from soundstorm.engine.model import load_config
from soundstorm.training import cli as training_cli
from soundstorm.training.config import TrainConfig
from soundstorm.training.synthetic import SyntheticSpec, write_synthetic_corpus
from soundstorm.training.data import DataPosition, TrainStream
from soundstorm.training.masking import masked_loss, sample_mask
from soundstorm.training.trainer import Trainer, load_init_weights

from training_helpers import cli, train_losses

# Training runs bitwise-reproducibly only with one thread per process.
pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--preset", "tiny", "--batch-size", 4, "--max-seconds", 1, "--min-seconds", 0.2,
          "--warmup-steps", 3, "--log-every", 1, "--no-progress"]
DEMO_MODEL = "demo/model"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("traincli")
    spec = SyntheticSpec(min_seconds=0.3, max_seconds=1.5)
    write_synthetic_corpus(root / "a", 40, spec, seed=0)
    write_synthetic_corpus(root / "b", 40, spec, seed=1)
    return root


def fails(capsys, *argv):
    """Run a command that must fail: its one-line error (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# -- --init-from ----------------------------------------------------------------------
def first_step_loss(model, config):
    """The loss `model` has on the first training batch of `config` (its masks too)."""
    trainer = Trainer(config)
    _, micro = next(TrainStream(trainer.sampler, 0, 1, 1)(DataPosition()))
    batch = micro[0]
    masked = sample_mask(batch.tokens, batch.lengths, batch.keys, config.seed,
                         model.config.mask_id)
    with torch.no_grad():
        parts = masked_loss(model(batch.semantic, masked.inputs, batch.lengths,
                                  level=masked.level), masked)
    return float(parts.loss_sum.sum() / parts.count.sum())


def test_init_from_a_saved_model_starts_at_its_loss(corpora, tmp_path, capsys):
    data = ["--data", corpora / "a"]
    cli("train", *COMMON, *data, "--out", tmp_path / "base", "--steps", 40, "--lr", 3e-3,
        "--checkpoint-every", 40)
    base = train_losses(tmp_path / "base")
    # the weights stored as float16, as the shipped demo model stores them
    half = tmp_path / "half"
    SoundStorm.from_pretrained(tmp_path / "base" / "model", dtype=torch.float16) \
        .save_pretrained(half)
    assert load_file(half / "model.safetensors")["head_weight"].dtype == torch.float16
    for name, source in (("fp32", tmp_path / "base" / "model"), ("fp16", half)):
        cli("train", *COMMON, *data, "--out", tmp_path / name, "--steps", 2, "--lr", 1e-5,
            "--init-from", source, "--checkpoint-every", 2)
    fp32, fp16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "fp16")
    # Step 1 of a fine-tuning is the loss of the model it starts from on the first batch
    config = TrainConfig.preset("tiny", data=str(corpora / "a"), out=str(tmp_path / "probe"),
                                batch_size=4, max_seconds=1.0, min_seconds=0.2)
    trained = first_step_loss(SoundStorm.from_pretrained(tmp_path / "base" / "model"), config)
    print(f"first batch: loss {base[1]:.4f} at initialisation, {trained:.4f} after 40 steps; "
          f"fine-tuning from those weights starts at {fp32[1]:.4f} (fp32), {fp16[1]:.4f} "
          "(stored as fp16)")
    assert fp32[1] == pytest.approx(trained, rel=1e-5)
    assert fp16[1] == pytest.approx(trained, rel=1e-2)
    assert trained < base[1] - 0.3                  # and that is not a fresh model's loss
    config = json.loads((tmp_path / "fp32" / "train_config.json").read_text())
    assert config["init_from"] == str(tmp_path / "base" / "model")


def test_init_from_takes_the_directorys_config_and_refuses_conflicting_sizes(corpora, tmp_path,
                                                                            capsys):
    cfg = TrainConfig.preset("tiny", init_from=DEMO_MODEL)
    assert cfg.model_config() == load_config(DEMO_MODEL)
    assert cfg.model_config().dim == 256     # not the tiny preset's 64
    # the shipped model's float16 weights arrive upcast, as the engine loads them
    model = SoundStorm(cfg.model_config())
    load_init_weights(model, DEMO_MODEL)
    stored = load_file(f"{DEMO_MODEL}/model.safetensors")
    assert stored["head_weight"].dtype == torch.float16
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, stored[name].float()), name

    base = ["train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "r",
            "--init-from", DEMO_MODEL]
    err = fails(capsys, *base, "--dim", 64)
    assert "dim = 64 (the model has 256)" in err
    err = fails(capsys, *base, "--model-preset", "tiny")
    assert "init_from = 'demo/model' takes the model from that directory" in err
    # the demo model reads 256-code tokens, the synthetic tiny corpus has 32
    err = fails(capsys, *base)
    assert "does not fit the model of --init-from demo/model" in err
    assert "codebook_size: corpus 32, model 256" in err
    err = fails(capsys, "train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "r",
                "--init-from", tmp_path / "nowhere")
    assert f"init_from = '{tmp_path / 'nowhere'}'" in err
    assert not (tmp_path / "r").exists()


def test_init_from_can_add_a_prompt_lookup_to_a_model_without_one(corpora, tmp_path, capsys):
    data = ["--data", corpora / "a"]
    cli("train", *COMMON, *data, "--out", tmp_path / "base", "--steps", 4,
        "--checkpoint-every", 4)
    base_dir = tmp_path / "base" / "model"
    base = SoundStorm.from_pretrained(base_dir)
    assert base.lookup is None
    cfg = TrainConfig.preset("tiny", init_from=str(base_dir),
                             model_overrides={"prompt_lookup": 8})
    assert cfg.model_config() == dataclasses.replace(base.config, prompt_lookup=8)
    torch.manual_seed(0)
    grown = SoundStorm(cfg.model_config())
    fresh = {k: v.clone() for k, v in grown.state_dict().items() if k.startswith("lookup.")}
    load_init_weights(grown, str(base_dir))
    for name, tensor in grown.state_dict().items():
        want = fresh[name] if name.startswith("lookup.") else base.state_dict()[name]
        assert torch.equal(tensor, want), name
    # The lookup's gain starts at 0 and its gates almost shut: the grown model starts no
    # worse than the model it grew from (the small copy can only help an unsure head),
    # where open gates would cost it dearly; it trains from there.
    config = TrainConfig.preset("tiny", data=str(corpora / "a"), out=str(tmp_path / "probe"),
                                batch_size=4, max_seconds=1.0, min_seconds=0.2)
    before, after = first_step_loss(base, config), first_step_loss(grown, config)
    with torch.no_grad():
        grown.lookup.copy_bias.fill_(10.0)
    opened = first_step_loss(grown, config)
    assert after < before + 0.05 and opened > before + 0.5
    cli("train", *COMMON, *data, "--out", tmp_path / "grown", "--steps", 2,
        "--init-from", base_dir, "--prompt-lookup", 8, "--checkpoint-every", 2)
    assert load_config(tmp_path / "grown" / "model").prompt_lookup == 8
    # A lookup's width cannot change, nor the lookup go, once the model has one.
    err = fails(capsys, "train", *COMMON, *data, "--out", tmp_path / "r",
                "--init-from", tmp_path / "grown" / "model", "--prompt-lookup", 4)
    assert "prompt_lookup = 4 (the model has 8)" in err
    err = fails(capsys, "train", *COMMON, *data, "--out", tmp_path / "r",
                "--init-from", tmp_path / "grown" / "model", "--prompt-lookup", 0)
    assert "prompt_lookup = 0 (the model has 8)" in err
    assert not (tmp_path / "r").exists()


# -- model presets and sizes ----------------------------------------------------------
def test_model_preset_flag_and_its_deprecated_alias(capsys):
    parser = training_cli.train_parser()
    help_text = parser.format_help()
    assert "--model-preset PRESET" in help_text and "--model " not in help_text
    args = parser.parse_args(["--preset", "tiny", "--model-preset", "small"])
    assert training_cli.build_train_config(args).model == "small"
    assert "deprecated" not in capsys.readouterr().err
    args = parser.parse_args(["--preset", "tiny", "--model", "small"])
    assert training_cli.build_train_config(args).model == "small"
    assert "--model PRESET is deprecated; use --model-preset PRESET" in capsys.readouterr().err
    # synthetic-corpus: --preset, with --model kept as a deprecated alias too
    assert "--model" not in training_cli.synthetic_parser().format_help()


def test_size_flags_apply_over_the_preset_and_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model_overrides:\n  heads: 2\n  depth: 3\n")
    parser = training_cli.train_parser()
    args = parser.parse_args(["--preset", "tiny", "--config", str(tmp_path / "c.yaml"),
                              "--dim", "32", "--depth", "1", "--ff-dim", "48"])
    model = training_cli.build_train_config(args).model_config()
    assert (model.dim, model.depth, model.heads, model.ff_dim) == (32, 1, 2, 48)
    assert model.num_quantizers == 4           # the rest is the tiny preset's
    for name in ("--dim", "--depth", "--heads", "--ff-dim", "--max-frames", "--conv-kernel",
                 "--num-quantizers", "--codebook-size", "--semantic-vocab-size",
                 "--prompt-lookup"):
        assert name in parser.format_help()
    with pytest.raises(ValueError, match="dim .30. must be divisible by heads"):
        training_cli.build_train_config(parser.parse_args(["--preset", "tiny", "--dim", "30"]))


# -- --level-weights -------------------------------------------------------------------
def test_level_weights_train_only_the_levels_weighted_and_validate_them_all(corpora, tmp_path,
                                                                           capsys):
    (tmp_path / "c.yaml").write_text("level_weights: [1, 1, 1, 1]\n")
    parser = training_cli.train_parser()
    args = parser.parse_args(["--preset", "tiny", "--config", str(tmp_path / "c.yaml"),
                              "--level-weights", "3,2,1,1"])
    assert training_cli.build_train_config(args).level_weights == (3.0, 2.0, 1.0, 1.0)
    assert training_cli.build_train_config(parser.parse_args(
        ["--preset", "tiny", "--config", str(tmp_path / "c.yaml")])).level_weights == (1, 1, 1, 1)
    assert "level_weights must be 4 numbers" in fails(
        capsys, "train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "bad",
        "--level-weights", "1,1")
    with pytest.raises(SystemExit) as e:   # argparse's usage, then the flag's error
        cli("train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "bad",
            "--level-weights", "1,x")
    assert e.value.code == 2
    assert "--level-weights: expected numbers separated by commas, got '1,x'" in \
        capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # all weight on level 2: training counts level-2 tokens only; validation, uniform as
    # the paper's, still scores every level
    cli("train", *COMMON, "--data", corpora / "a", "--val-data", corpora / "b", "--out",
        tmp_path / "run", "--steps", 6, "--val-every", 6, "--level-weights", "0,1,0,0")
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "acc_level" in r]
    val = [r for r in records if "val_acc_level" in r]
    assert len(train) == 6 and val
    for r in train:
        assert r["acc_level"][1] is not None
        assert [r["acc_level"][i] for i in (0, 2, 3)] == [None, None, None]
    assert all(a is not None for a in val[-1]["val_acc_level"])
    saved = json.loads((tmp_path / "run/train_config.json").read_text())
    assert saved["level_weights"] == [0.0, 1.0, 0.0, 0.0]
    assert saved["level_weights_end"] is None
    # weights that move over the run: level 1 only at the first step, level 4 only at the last
    cli("train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "moving", "--steps", 6,
        "--level-weights", "1,0,0,0", "--level-weights-end", "0,0,0,1")
    records = [json.loads(x) for x in
               (tmp_path / "moving/metrics.jsonl").read_text().splitlines()]
    train = [r["acc_level"] for r in records if "acc_level" in r]
    assert len(train) == 6
    assert [a is not None for a in train[0]] == [True, False, False, False]
    assert [a is not None for a in train[-1]] == [False, False, False, True]
    assert all(a[1] is None and a[2] is None for a in train)
    saved = json.loads((tmp_path / "moving/train_config.json").read_text())
    assert saved["level_weights_end"] == [0.0, 0.0, 0.0, 1.0]
    assert "level_weights_end must be 4 numbers" in fails(
        capsys, "train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "bad",
        "--level-weights-end", "1,1")


# -- resuming: the same data, one config file per invocation, nothing to do -------------

def test_finer_full_mask_reaches_the_training_masks_and_not_validation(corpora, tmp_path,
                                                                      monkeypatch, capsys):
    import soundstorm.training.trainer as trainer_module
    drawn = []

    def recording(*args, **kwargs):
        m = sample_mask(*args, **kwargs)
        drawn.append((args[3], m.level.clone(), m.ratio.clone()))
        return m

    monkeypatch.setattr(trainer_module, "sample_mask", recording)
    cli("train", *COMMON, "--data", corpora / "a", "--val-data", corpora / "b", "--out",
        tmp_path / "run", "--steps", 4, "--val-every", 4, "--level-weights", "0,1,1,0",
        "--finer-full-mask", 1)
    seed = json.loads((tmp_path / "run/train_config.json").read_text())["seed"]
    train = [(lv, r) for s, lv, r in drawn if s == seed]
    val = [(lv, r) for s, lv, r in drawn if s != seed]
    assert len(train) == 4 and val
    assert all((r == 1).all() for _, r in train)            # every finer row fully masked
    assert any((r < 1).any() for _, r in val)                # validation keeps the paper's
    saved = json.loads((tmp_path / "run/train_config.json").read_text())
    assert saved["finer_full_mask"] == 1.0
    assert "finer_full_mask must be a number in [0, 1]" in fails(
        capsys, "train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "bad",
        "--finer-full-mask", 2)
    assert not (tmp_path / "bad").exists()


def test_resume_needs_the_same_data_and_keeps_each_invocations_settings(corpora, tmp_path,
                                                                        capsys):
    out = tmp_path / "run"
    run = ["train", *COMMON, "--out", out, "--checkpoint-every", 5, "--keep-checkpoints", 3]
    cli(*run, "--data", corpora / "a", "--steps", 10)
    assert json.loads((out / "train_config.json").read_text())["steps"] == 10
    metrics = (out / "metrics.jsonl").read_text()

    capsys.readouterr()
    assert cli(*run, "--data", corpora / "a", "--steps", 10) == 0
    assert capsys.readouterr().out.startswith("already at step 10 of 10; nothing to do.")
    assert (out / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in out.glob("train_config*")) == ["train_config.json"]

    err = fails(capsys, *run, "--data", corpora / "a", "--steps", 15, "--batch-size", 8)
    assert "was trained on another data stream: batch_size: checkpoint 4, now 8" in err
    assert "--allow-changed-data" in err
    err = fails(capsys, *run, "--data", corpora / "b", "--steps", 15)
    assert f"data: checkpoint {corpora / 'a'} (sha256 " in err and f"now {corpora / 'b'}" in err
    assert sorted(p.name for p in out.glob("train_config*")) == ["train_config.json"]
    assert (out / "metrics.jsonl").read_text() == metrics

    # the same corpus in another place is the same data
    moved = tmp_path / "moved"
    shutil.copytree(corpora / "a", moved)
    assert cli(*run, "--data", moved, "--steps", 15) == 0
    assert sorted(train_losses(out)) == list(range(1, 16))
    # and a changed batch size continues when asked to, with a warning
    capsys.readouterr()
    assert cli(*run, "--data", moved, "--steps", 20, "--batch-size", 8,
               "--allow-changed-data") == 0
    captured = capsys.readouterr()
    assert "warning: checkpoint" in captured.err and "batch_size: checkpoint 4, now 8" in captured.err
    assert "trained to step 20 (5 steps this run)" in captured.out

    configs = {p.name: json.loads(p.read_text()) for p in out.glob("train_config*")}
    assert sorted(configs) == ["train_config.json", "train_config.step-00000010.json",
                               "train_config.step-00000015.json"]
    assert configs["train_config.json"]["steps"] == 10
    assert configs["train_config.json"]["data"] == str(corpora / "a")
    assert configs["train_config.step-00000010.json"]["data"] == str(moved)
    assert configs["train_config.step-00000015.json"]["batch_size"] == 8


def test_joined_utterances_train_validate_and_bind_the_resume(corpora, tmp_path, capsys):
    out = tmp_path / "joined"
    run = ["train", *COMMON, "--data", corpora / "a", "--out", out, "--val-fraction", 0.25,
           "--val-every", 4, "--checkpoint-every", 4]
    cli(*run, "--steps", 4, "--join-utterances", 3)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["join_utterances"] == 3
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 4 and any("val_loss" in r for r in records)
    err = fails(capsys, *run, "--steps", 8)
    assert "was trained on another data stream: join_utterances: checkpoint 3, now 1" in err
    assert cli(*run, "--steps", 8, "--join-utterances", 3) == 0
    assert sorted(train_losses(out)) == list(range(1, 9))
    assert "join_utterances = 0: expected an int >= 1" in fails(
        capsys, "train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "bad",
        "--join-utterances", 0)
    assert not (tmp_path / "bad").exists()


def test_joining_a_corpus_of_one_speaker_id_warns(corpora, tmp_path):
    one = tmp_path / "one-speaker"
    shutil.copytree(corpora / "a", one)
    lines = [json.loads(x) for x in (one / "manifest.jsonl").read_text().splitlines()]
    assert len({x["speaker"] for x in lines}) > 1
    (one / "manifest.jsonl").write_text("".join(json.dumps({**x, "speaker": 0}) + "\n"
                                                for x in lines))
    with pytest.warns(UserWarning, match=f"joins the {len(lines)} utterances of .* as one "
                                         "voice: they all have speaker id 0"):
        cli("train", *COMMON, "--data", one, "--out", tmp_path / "run", "--steps", 1,
            "--join-utterances", 2)
    with warnings.catch_warnings(record=True) as caught:   # many speakers: no word of it
        warnings.simplefilter("always")
        cli("train", *COMMON, "--data", corpora / "a", "--out", tmp_path / "run2", "--steps", 1,
            "--join-utterances", 2)
    assert not [w for w in caught if "as one voice" in str(w.message)]
    with pytest.warns(UserWarning, match=f"joins the {len(lines)} utterances of {one} as one "
                                         "voice"):   # a --val-data corpus is joined too
        cli("train", *COMMON, "--data", corpora / "a", "--val-data", one, "--out",
            tmp_path / "run3", "--steps", 1, "--join-utterances", 2)


def test_checkpoints_from_before_joining_resume_as_unjoined():
    from soundstorm.training.trainer import data_changes
    now = {"data": "a", "data_sha256": "x", "batch_size": 4, "seed": 0, "val_fraction": 0.0,
           "min_seconds": 1.0, "max_seconds": 2.0, "bucket_batches": 0, "join_utterances": 1}
    before = {k: v for k, v in now.items() if k != "join_utterances"}
    assert data_changes(before, now) == []
    assert data_changes(before, {**now, "join_utterances": 2}) == [
        "join_utterances: checkpoint 1, now 2"]


# -- the progress flags ---------------------------------------------------------------
@pytest.mark.parametrize("parser, argv", [
    (training_cli.train_parser, ["--preset", "tiny"]),
    (training_cli.synthetic_parser, ["out"]),
    (training_cli.speech_corpus_parser, ["out"]),
    (training_cli.fit_codec_parser, ["a.wav", "--out", "c"]),
    (training_cli.fit_semantic_parser, ["a.wav", "--out", "s"]),
    (training_cli.tokenize_parser, ["a.wav", "--out", "t", "--semantic", "s"]),
])
def test_every_training_command_takes_no_progress_and_its_alias_quiet(parser, argv):
    p = parser()
    assert p.parse_args(argv).progress is None
    assert p.parse_args(argv + ["--no-progress"]).progress is False
    assert p.parse_args(argv + ["--quiet"]).progress is False
    assert "--no-progress, --quiet" in p.format_help()
