import dataclasses

import pytest
import torch

from soundstorm.engine import DecodeConfig, ModelConfig, SoundStorm

EXPECTED = {
    "paper": dict(dim=1024, depth=12, heads=16, ff_dim=4096, conv_kernel=5, conv_expansion=2,
                  num_quantizers=12, codebook_size=1024, semantic_vocab_size=1024,
                  semantic_rate=25, frame_rate=50, max_frames=1500),
    "small": dict(dim=512, depth=6, heads=8, ff_dim=2048, conv_kernel=5, conv_expansion=2,
                  num_quantizers=12, codebook_size=1024, semantic_vocab_size=1024,
                  semantic_rate=25, frame_rate=50, max_frames=1500),
    "tiny": dict(dim=64, depth=2, heads=4, ff_dim=128, conv_kernel=5, conv_expansion=2,
                 num_quantizers=4, codebook_size=32, semantic_vocab_size=16,
                 semantic_rate=25, frame_rate=50, max_frames=256),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_have_the_documented_shapes(name):
    # every preset is the paper's model: no prompt lookup
    assert ModelConfig.preset(name).to_dict() == {**EXPECTED[name], "prompt_lookup": 0,
                                                  "semantic_copy": False,
                                                  "prompt_prior": False}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count_matches_a_model_built_on_meta(name):
    config = ModelConfig.preset(name)
    with torch.device("meta"):
        model = SoundStorm(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.num_parameters == config.num_parameters()


def test_paper_preset_is_about_350M_parameters():
    assert 340e6 < ModelConfig.preset("paper").num_parameters() < 360e6


def test_preset_overrides_and_unknown_preset():
    assert ModelConfig.preset("tiny", depth=3).depth == 3
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.preset("tiny", layers=3)


@pytest.mark.parametrize("field,value,match", [
    ("dim", 0, "dim must be >= 1"),
    ("depth", 2.0, "depth must be an int"),
    ("heads", 5, "divisible by heads"),
    ("dim", 66, "divisible by heads"),
    ("dim", 68, "head dimension .* must be even"),
    ("heads", 64, "must be even"),
    ("conv_kernel", 4, "conv_kernel must be odd"),
    ("frame_rate", 0, "frame_rate must be a positive"),
    ("semantic_rate", float("nan"), "semantic_rate must be a positive"),
    ("codebook_size", True, "codebook_size must be an int"),
])
def test_model_config_validation(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ModelConfig.preset("tiny", **{field: value})


def test_frame_mapping_is_exact_for_fractional_rates():
    cfg = ModelConfig.preset("tiny", semantic_rate=12.5, frame_rate=75)
    assert cfg.frames_for(5) == 30
    num, den = cfg.semantic_index_fraction()
    assert [(t * num) // den for t in range(8)] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert ModelConfig.preset("tiny").frames_for(3) == 6


def test_decode_config_defaults_follow_the_paper():
    d = DecodeConfig()
    assert d.resolve(12) == (16,) + (1,) * 11
    assert d.num_forward_passes(12) == 27
    assert (d.temperature, d.gumbel_scale, d.greedy_last) == (1.0, 1.0, True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps_per_level=(16, 0, 1)), r"steps_per_level\[1\] \(level 2\) must be >= 1"),
    (dict(steps_per_level=()), "must not be empty"),
    (dict(steps_per_level=(2.0, 1)), "must be an int"),
    (dict(steps_per_level="16"), "sequence of ints"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(gumbel_scale=float("inf")), "gumbel_scale must be a finite"),
    (dict(greedy_last=1), "greedy_last must be a bool"),
])
def test_decode_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DecodeConfig(**kwargs)


def test_decode_config_must_match_the_number_of_levels():
    with pytest.raises(ValueError, match="has 3 entries .* the model has 4 RVQ levels"):
        DecodeConfig(steps_per_level=[4, 1, 1]).resolve(4)
    assert DecodeConfig(steps_per_level=[4, 2, 1, 1]).steps_per_level == (4, 2, 1, 1)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig.preset("tiny").dim = 3


@pytest.mark.parametrize("field,value", [
    ("max_frames", 10 ** 12), ("depth", 10 ** 6), ("dim", 10 ** 9), ("heads", 2048),
    ("ff_dim", 2 ** 30), ("codebook_size", 2 ** 40), ("semantic_vocab_size", 2 ** 21),
    ("num_quantizers", 65), ("conv_kernel", 1001), ("conv_expansion", 17),
])
def test_sizes_above_their_limits_are_refused(field, value):
    limit = ModelConfig.LIMITS[field]
    with pytest.raises(ValueError, match=rf"{field} = {value} is above its limit {limit}"):
        ModelConfig.preset("tiny", **{field: value})
    ModelConfig.preset("tiny", **{field: limit} if field not in ("dim", "heads", "conv_kernel")
                       else {})   # the limit itself is allowed


def test_the_largest_sizes_are_allowed():
    cfg = ModelConfig(num_quantizers=64, codebook_size=2 ** 20, semantic_vocab_size=2 ** 20,
                      dim=2 ** 16, depth=256, heads=1024, ff_dim=2 ** 18, conv_kernel=255,
                      conv_expansion=16, max_frames=2 ** 16)
    assert cfg.num_parameters() > 10 ** 13     # analytic: nothing is built


@pytest.mark.parametrize("rates,match", [
    ((25, 2e6), "frame_rate = 2000000.0 Hz is above the limit"),
    ((1 / 3, 50), r"reduces to .*; both terms must be at most 1048576"),
    ((25, 1e-9), "reduces to"),
])
def test_rates_must_be_small_fractions(rates, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("tiny", semantic_rate=rates[0], frame_rate=rates[1])


@pytest.mark.parametrize("rates,fewest", [((25, 50), 1), ((50, 12.5), 4), ((25, 75), 1),
                                          ((50, 37.5), 2)])
def test_fewest_semantic_ids_for_one_frame(rates, fewest):
    cfg = ModelConfig.preset("tiny", semantic_rate=rates[0], frame_rate=rates[1])
    assert cfg.min_semantic_len() == fewest
    assert cfg.frames_for(fewest) >= 1 and cfg.frames_for(fewest - 1) < 1


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(temperature=1e-300), ValueError, "below the smallest sampling temperature 0.0001.*temperature=0"),
    (dict(temperature=1e-45), ValueError, "below the smallest sampling temperature"),
    (dict(temperature=5e-5), ValueError, "below the smallest sampling temperature"),
    (dict(temperature=1e300), ValueError, "temperature = 1e[+]300 is above the limit"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number"),
    (dict(temperature="1"), TypeError, "temperature must be a finite number .*str"),
    (dict(gumbel_scale=float("nan")), ValueError, "gumbel_scale must be a finite number"),
    (dict(gumbel_scale=float("-inf")), ValueError, "gumbel_scale must be a finite number"),
    (dict(gumbel_scale=1e300), ValueError, "gumbel_scale = 1e[+]300 is above the limit"),
    (dict(steps_per_level=(10 ** 9, 1)), ValueError, r"steps_per_level\[0\] \(level 1\) = 1000000000 is above the limit 1024"),
])
def test_decode_values_outside_float32_sense_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DecodeConfig(**kwargs)


def test_smallest_temperatures_that_are_allowed():
    assert DecodeConfig(temperature=0).temperature == 0
    assert DecodeConfig(temperature=1e-4).temperature == 1e-4
    assert DecodeConfig(temperature=1e6, gumbel_scale=1e6).gumbel_scale == 1e6
