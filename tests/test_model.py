import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from soundstorm.engine import ModelConfig, SoundStorm
from soundstorm.kernels.embedding import summed_embedding_reference

from conftest import make_model, random_codes, random_semantic


def masked_tokens(config, B, T, seed=0, p_mask=0.5):
    tokens = random_codes(config, B, T, config.num_quantizers, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return tokens.masked_fill(torch.rand(tokens.shape, generator=g) < p_mask, config.mask_id)


@pytest.fixture(scope="module")
def model64(tiny_config):
    return make_model(tiny_config, seed=3).double()


def test_output_shapes_for_each_kind_of_level(model64, tiny_config):
    cfg = tiny_config
    sem, tok = random_semantic(cfg, 2, 10), masked_tokens(cfg, 2, 20)
    with torch.no_grad():
        assert model64(sem, tok, level=2).shape == (2, 20, cfg.codebook_size)
        assert model64(sem, tok, level=torch.tensor([1, 4])).shape == (2, 20, cfg.codebook_size)
        assert model64(sem, tok).shape == (2, 20, cfg.num_quantizers, cfg.codebook_size)


def test_heads_agree_across_level_forms(model64, tiny_config):
    cfg = tiny_config
    sem, tok = random_semantic(cfg, 3, 12), masked_tokens(cfg, 3, 24)
    with torch.no_grad():
        every = model64(sem, tok)
        for q in range(1, cfg.num_quantizers + 1):
            torch.testing.assert_close(model64(sem, tok, level=q), every[:, :, q - 1])
        per_row = model64(sem, tok, level=torch.tensor([3, 1, 4]))
    for b, q in enumerate([3, 1, 4]):
        torch.testing.assert_close(per_row[b], every[b, :, q - 1])


@pytest.mark.parametrize("level", [0, 5, -1, 1.0, True, "1"])
def test_bad_level_is_rejected(model64, tiny_config, level):
    sem, tok = random_semantic(tiny_config, 1, 4), masked_tokens(tiny_config, 1, 8)
    with pytest.raises(ValueError, match="level must be an int in 1..4"):
        model64(sem, tok, level=level)


def test_forward_shape_errors(model64, tiny_config):
    cfg = tiny_config
    with pytest.raises(ValueError, match=r"tokens must be \[B, T, Q=4\]"):
        model64(random_semantic(cfg, 1, 4), torch.zeros(1, 8, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="semantic has 3 ids, too few for 8 frames"):
        model64(random_semantic(cfg, 1, 3), masked_tokens(cfg, 1, 8))
    with pytest.raises(ValueError, match="more than max_frames=256"):
        model64(random_semantic(cfg, 1, 200), masked_tokens(cfg, 1, 300))


def test_a_row_does_not_depend_on_its_padding(model64, tiny_config):
    """Attention keys and the depthwise convolution must ignore frames past the length,
    whatever stands there."""
    cfg = tiny_config
    sem, tok = random_semantic(cfg, 1, 9, seed=1), masked_tokens(cfg, 1, 17, seed=2)
    with torch.no_grad():
        alone = model64(sem, tok, level=1)
        for pad, seed in ((1, 5), (6, 6), (23, 7)):
            sem_p = torch.cat([sem, random_semantic(cfg, 1, (pad + 1) // 2 + 1, seed=seed)], 1)
            tok_p = torch.cat([tok, masked_tokens(cfg, 1, pad, seed=seed)], 1)
            sem_p = sem_p[:, : (tok_p.shape[1] + 1) // 2]
            padded = model64(sem_p, tok_p, lengths=torch.tensor([17]), level=1)
            torch.testing.assert_close(padded[:, :17], alone, rtol=1e-12, atol=1e-12)


def test_a_row_does_not_depend_on_its_batch_companions(model64, tiny_config):
    cfg = tiny_config
    sem, tok = random_semantic(cfg, 3, 15, seed=4), masked_tokens(cfg, 3, 30, seed=5)
    lengths = torch.tensor([30, 11, 23])
    with torch.no_grad():
        batch = model64(sem, tok, lengths=lengths, level=torch.tensor([1, 2, 3]))
        for b, (n, q) in enumerate(zip(lengths.tolist(), [1, 2, 3])):
            alone = model64(sem[b:b + 1, : (n + 1) // 2], tok[b:b + 1, :n], level=q)
            torch.testing.assert_close(batch[b:b + 1, :n], alone, rtol=1e-12, atol=1e-12)


def test_summed_embedding_matches_its_definition(tiny_config):
    cfg = ModelConfig.preset("tiny", semantic_rate=12.5, frame_rate=75)
    torch.manual_seed(0)
    Q, C, D = cfg.num_quantizers, cfg.codebook_size, 8
    sem_table, ac_table = torch.randn(cfg.semantic_vocab_size, D), torch.randn(Q * C + 1, D)
    sem, tok = random_semantic(cfg, 2, 4), masked_tokens(cfg, 2, 23)
    num, den = cfg.semantic_index_fraction()
    got = summed_embedding_reference(sem, tok, sem_table, ac_table, num, den)
    for b in range(2):
        for t in range(23):
            want = sem_table[sem[b, int(t * 12.5 / 75)]].clone()
            for q in range(Q):
                c = int(tok[b, t, q])
                want += ac_table[-1] if c == C else ac_table[q * C + c]
            torch.testing.assert_close(got[b, t], want)


def test_save_and_load_round_trip(tmp_path, model64, tiny_config):
    cfg = tiny_config
    model64.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = SoundStorm.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg and not loaded.training
    sem, tok = random_semantic(cfg, 2, 8), masked_tokens(cfg, 2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(sem, tok), model64(sem, tok))
    half = SoundStorm.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.head_weight.dtype == torch.bfloat16


def test_missing_files_raise_file_not_found(tmp_path, model64):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        SoundStorm.from_pretrained(tmp_path / "nowhere")
    model64.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SoundStorm.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SoundStorm.from_pretrained(tmp_path / "m")


def _edit_weights(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("blocks.1.conv.depthwise.weight"), "missing tensor 'blocks.1.conv.depthwise.weight'"),
    (lambda s: s.__setitem__("head_bias", torch.zeros(4, 33)), r"'head_bias' has shape \(4, 33\)"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "unexpected tensor 'extra.weight'"),
    (lambda s: s.__setitem__("head_bias", torch.zeros(4, 32, dtype=torch.int64)), "dtype torch.int64"),
])
def test_mismatched_checkpoint_names_the_first_problem(tmp_path, model64, edit, match):
    model64.save_pretrained(tmp_path)
    _edit_weights(tmp_path / "model.safetensors", edit)
    with pytest.raises(ValueError, match=match):
        SoundStorm.from_pretrained(tmp_path)


def test_config_that_disagrees_with_weights(tmp_path, model64):
    model64.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["model"]["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing tensor 'blocks.2."):
        SoundStorm.from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["heads", "conv_kernel", "max_frames"])
def test_a_config_without_a_field_does_not_load_with_its_default(tmp_path, model64, field):
    # heads and max_frames do not show in the weights' shapes: a default would load silently
    model64.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["model"][field]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"missing field\(s\) \['{field}'\]"):
        SoundStorm.from_pretrained(tmp_path)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a soundstorm model config"),
    ('{"format": "soundstorm", "format_version": 9, "model": {}}', "format_version 9"),
    ('{"format": "soundstorm", "format_version": 1, "model": {"dim": -1}}', "invalid model config"),
    ('{"format": "soundstorm", "format_version": 1, "model": {"width": 1}}', "unknown ModelConfig field"),
    ('{"format": "soundstorm", "format_version": 1, "model": {"depth": 1000000}}',
     "invalid model config: depth = 1000000 is above its limit 256"),
    ('{"format": "soundstorm", "format_version": 1, "model": {"max_frames": 1000000000000}}',
     "invalid model config: max_frames = 1000000000000 is above its limit 65536"),
])
def test_bad_config_file(tmp_path, model64, text, match):
    model64.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        SoundStorm.from_pretrained(tmp_path)


def test_corrupted_weights_file(tmp_path, model64):
    model64.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        SoundStorm.from_pretrained(tmp_path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SoundStorm.from_pretrained(tmp_path)


@pytest.mark.parametrize("T", [1, 2, 7, 31])
def test_conv_module_matches_a_plain_depthwise_conv1d(T):
    """The reference's shifted multiply-adds equal conv1d with zero padding, and padded
    frames read as zeros."""
    import torch.nn.functional as F
    from soundstorm.kernels.conv_module import conv_module_reference
    torch.manual_seed(T)
    B, E, K = 3, 12, 5
    h = torch.randn(B, T, 2 * E, dtype=torch.float64)
    w, b = torch.randn(E, 1, K, dtype=torch.float64), torch.randn(E, dtype=torch.float64)
    nw, nb = torch.randn(E, dtype=torch.float64), torch.randn(E, dtype=torch.float64)
    lengths = torch.tensor([T, max(1, T - 3), 1])
    mask = torch.arange(T)[None] < lengths[:, None]
    x = F.glu(h, -1) * mask[..., None]
    want = F.conv1d(x.transpose(1, 2), w, b, padding=K // 2, groups=E).transpose(1, 2)
    want = F.silu(F.layer_norm(want, (E,), nw, nb))
    got = conv_module_reference(h, w, b, nw, nb, mask)
    torch.testing.assert_close(got, want)


# -- sizes, memory, checksums, finite weights --------------------------------------------
import hashlib                                                    # noqa: E402
import struct                                                     # noqa: E402
from pathlib import Path                                          # noqa: E402

from soundstorm.engine import Engine                              # noqa: E402
from soundstorm.engine import model as model_module               # noqa: E402
from soundstorm.engine.model import (CHECKSUM_KEY, InsufficientMemoryError,  # noqa: E402
                                     check_pretrained, expected_shapes)

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    huge = ModelConfig(dim=2 ** 16, depth=256, heads=1024, ff_dim=2 ** 18)   # within the limits
    with pytest.raises(InsufficientMemoryError,
                       match=r"parameters need [\d,]+ bytes .* on cpu, more than the [\d,]+ bytes .* available"):
        SoundStorm(huge)
    with torch.device("meta"):                     # nothing is allocated on meta: no check
        assert SoundStorm(ModelConfig.preset("paper")).num_parameters > 0


def test_loading_checks_the_room_in_memory_first(tmp_path, model64, monkeypatch):
    model64.save_pretrained(tmp_path)
    needed = 4 * model64.config.num_parameters()
    monkeypatch.setattr(model_module, "available_memory", lambda device: needed - 1)
    read = []
    monkeypatch.setattr(model_module, "tensor_sha256", lambda t: read.append(t) or "")
    with pytest.raises(InsufficientMemoryError,
                       match=rf"model.safetensors: the parameters need {needed:,} bytes .* "
                             rf"more than the {needed - 1:,} bytes"):
        SoundStorm.from_pretrained(tmp_path, dtype=torch.float32)
    assert read == []                               # refused before reading any tensor
    with pytest.raises(ValueError, match="the parameters need"):
        Engine(tmp_path)                            # the engine loads in float32
    monkeypatch.undo()
    assert SoundStorm.from_pretrained(tmp_path, dtype=torch.float32).head_weight.dtype == torch.float32


def test_expected_shapes_match_the_model_without_building_it(tiny_config):
    import dataclasses
    cfg = dataclasses.replace(tiny_config, depth=5)
    with torch.device("meta"):
        built = {k: tuple(v.shape) for k, v in SoundStorm(cfg).state_dict().items()}
    shapes = expected_shapes(cfg)
    assert list(shapes.items()) == list(built.items())


def _poison(name, value):
    def edit(state):
        state[name] = state[name].clone()
        state[name].view(-1)[3] = value
    return edit


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, model64, value):
    model64.save_pretrained(tmp_path)
    _edit_weights(tmp_path / "model.safetensors", _poison("blocks.1.ff2.up.weight", value))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'blocks.1.ff2.up.weight' "
                                         r"holds 1 non-finite value\(s\) \(NaN or inf\)"):
        SoundStorm.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        check_pretrained(tmp_path)


def test_weights_that_overflow_the_requested_dtype_are_refused(tmp_path, model64):
    model64.save_pretrained(tmp_path)
    _edit_weights(tmp_path / "model.safetensors", _poison("head_bias", 1e6))
    assert SoundStorm.from_pretrained(tmp_path).head_bias.view(-1)[3] == 1e6
    with pytest.raises(ValueError, match=r"tensor 'head_bias' converted to torch.float16 holds 1 non-finite"):
        SoundStorm.from_pretrained(tmp_path, dtype=torch.float16)


def _data_start(path):
    header = path.read_bytes()[:8]
    return 8 + struct.unpack("<Q", header)[0]


def test_save_records_a_checksum_of_every_tensor(tmp_path, model64):
    from safetensors import safe_open
    model64.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        checksums = json.loads(f.metadata()[CHECKSUM_KEY])
        assert set(checksums) == set(f.keys())
        t = f.get_tensor("head_bias")
    assert checksums["head_bias"] == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert check_pretrained(tmp_path) == (model64.config, True)


def test_a_flipped_bit_in_the_tensor_data_is_reported(tmp_path, model64):
    model64.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    start = _data_start(path)
    spot = start + (len(data) - start) // 2 // 8 * 8    # the lowest mantissa byte of a float64
    data[spot] ^= 0x01                                   # still a finite number
    path.write_bytes(bytes(data))
    match = r"model.safetensors: tensor '.*' does not match the sha256 checksum .* corrupt"
    with pytest.raises(ValueError, match=match):
        SoundStorm.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        check_pretrained(tmp_path)


def test_unreadable_checksum_metadata_is_reported(tmp_path, model64):
    model64.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    save_file(state, str(path), metadata={"format": "soundstorm", CHECKSUM_KEY: "[1, 2]"})
    with pytest.raises(ValueError, match="'tensor_sha256' metadata is not a JSON object"):
        SoundStorm.from_pretrained(tmp_path)
    save_file(state, str(path), metadata={"format": "soundstorm", CHECKSUM_KEY: "{}"})
    with pytest.raises(ValueError, match="no sha256 checksum recorded for tensor"):
        SoundStorm.from_pretrained(tmp_path)


def test_files_without_checksums_still_load(tmp_path, model64):
    model64.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "soundstorm"})
    assert check_pretrained(tmp_path) == (model64.config, False)
    loaded = SoundStorm.from_pretrained(tmp_path)
    assert torch.equal(loaded.head_weight, model64.head_weight)


def test_the_shipped_demo_model_loads_as_stored():
    config, verified = check_pretrained(DEMO_MODEL)
    assert verified                                   # exported with its tensors' checksums
    model = SoundStorm.from_pretrained(DEMO_MODEL)
    assert model.config == config and model.head_weight.dtype == torch.float16
