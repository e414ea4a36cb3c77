"""EnCodec, DAC and Mimi through `transformers`, on real (espeak-ng) speech.

No weights can be downloaded here, so the models are small random ones (random_init=True
with a small config); loading from a directory is tested on a directory written by
`save_pretrained`, the layout of the published checkpoints (config.json + safetensors).
"""

import json

import numpy as np
import pytest
import torch

from soundstorm.engine.codecs import load_codec
from soundstorm.engine.codecs.audio import read_audio

from speech import espeak_corpus

SMALL = {
    "encodec": dict(num_filters=4, hidden_size=16, num_lstm_layers=1),
    "dac": dict(encoder_hidden_size=8, decoder_hidden_size=32, n_codebooks=6,
                downsampling_ratios=[2, 4, 5, 8]),           # 16 kHz / 320 = 50 Hz
    "mimi": dict(num_filters=4, hidden_size=32, codebook_dim=16, codebook_size=256,
                 vector_quantization_hidden_dimension=16, num_quantizers=6,
                 num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=2, upsample_groups=32),
}
# name -> (sample rate, hop, frame rate, Q, C) of the small models above
EXPECTED = {
    "encodec": (24000, 320, 75.0, 8, 1024),   # bandwidth 6 kbps: 8 levels of 10 bits at 75 Hz
    "dac": (16000, 320, 50.0, 6, 1024),
    "mimi": (24000, 1920, 12.5, 6, 256),
}


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """The first 1.2 s of two espeak-ng sentences at 22050 Hz, float32 [2, 26460] (short:
    random models run slowly on two shared cores)."""
    paths = espeak_corpus(tmp_path_factory.mktemp("speech"), [
        "The quick brown fox jumps over the lazy dog.",
        "She sells sea shells by the sea shore."])
    clips = [read_audio(p)[0] for p in paths]
    return torch.from_numpy(np.stack([c[:26460] for c in clips])), 22050


@pytest.fixture(scope="module", params=["encodec", "dac", "mimi"])
def codec(request):
    return load_codec(request.param, random_init=True, config=SMALL[request.param])


@pytest.fixture(scope="module")
def encoded(codec, speech):
    """(tokens, audio): the speech batch through the codec, once per codec."""
    wav, sr = speech
    tokens = codec.encode(wav, sr)                       # 22050 Hz: resampled with soxr
    return tokens, codec.decode(tokens)


def test_properties_come_from_the_model_config(codec):
    sr, hop, rate, q, c = EXPECTED[codec.name]
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate,
            codec.num_quantizers, codec.codebook_size) == (sr, hop, rate, q, c)


def test_round_trip_on_speech(codec, speech, encoded):
    wav, sr = speech
    tokens, audio = encoded
    n = round(wav.shape[1] * codec.sample_rate / sr)
    assert tokens.dtype == torch.int64
    assert tokens.shape == (2, -(-n // codec.hop_length), codec.num_quantizers)
    assert tokens.shape[1] == codec.num_frames(wav.shape[1], sr)
    assert tokens.min() >= 0 and tokens.max() < codec.codebook_size
    assert len(tokens.unique()) > 10                     # real, varied ids
    assert audio.dtype == torch.float32 and audio.shape == (2, tokens.shape[1] * codec.hop_length)
    assert torch.isfinite(audio).all() and audio.abs().max() > 0


def test_one_clip_and_numpy_input(codec, speech, encoded):
    wav, sr = speech
    batch = encoded[0]
    one = codec.encode(wav[0].numpy(), sr)
    assert one.shape == (1,) + batch.shape[1:]
    assert torch.equal(one[0], batch[0])                 # rows are encoded independently


def test_encode_at_the_codec_rate_skips_resampling(codec, speech, encoded):
    from soundstorm.engine.codecs.audio import resample

    wav, sr = speech
    native = resample(wav, sr, codec.sample_rate)
    assert torch.equal(codec.encode(native, codec.sample_rate), encoded[0])


def test_decode_rejects_wrong_levels_and_ids(codec):
    q, c = codec.num_quantizers, codec.codebook_size
    with pytest.raises(ValueError, match=f"has {q + 1} levels"):
        codec.decode(torch.zeros(1, 4, q + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"ids must be in \[0, {c}\)"):
        codec.decode(torch.full((1, 4, q), c))


def test_weights_load_from_a_local_directory(codec, speech, encoded, tmp_path):
    codec.model.save_pretrained(tmp_path / "weights")
    assert (tmp_path / "weights" / "config.json").is_file()
    assert list((tmp_path / "weights").glob("*.safetensors"))
    options = {"encodec": {"bandwidth": 6.0}}.get(codec.name, {})
    loaded = load_codec(codec.name, path=tmp_path / "weights", **options)
    wav, sr = speech
    tokens, audio = encoded
    assert torch.equal(loaded.encode(wav, sr), tokens)
    torch.testing.assert_close(loaded.decode(tokens), audio)


def test_weights_missing_from_the_checkpoint_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    dac = load_codec("dac", random_init=True, config=SMALL["dac"])
    dac.model.save_pretrained(tmp_path / "dac")
    weights = next((tmp_path / "dac").glob("*.safetensors"))
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lack 1 of the model's parameters"):
        load_codec("dac", path=tmp_path / "dac")


def test_a_directory_of_another_model_is_refused(tmp_path):
    dac = load_codec("dac", random_init=True, config=SMALL["dac"])
    dac.model.save_pretrained(tmp_path / "dac")
    with pytest.raises(ValueError, match="model_type='dac', but the encodec codec needs model_type='encodec'"):
        load_codec("encodec", path=tmp_path / "dac")


def test_random_init_is_explicit_and_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either path=... .* or random_init=True"):
        load_codec("dac", path=tmp_path, random_init=True)
    with pytest.raises(ValueError, match="config= overrides apply only with random_init=True"):
        load_codec("dac", path=tmp_path, config={"n_codebooks": 4})


def test_random_init_is_seeded(speech):
    wav, sr = speech
    a = load_codec("dac", random_init=True, config=SMALL["dac"], seed=3).encode(wav[:, :4000], sr)
    b = load_codec("dac", random_init=True, config=SMALL["dac"], seed=3).encode(wav[:, :4000], sr)
    assert torch.equal(a, b)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_codec("dac", random_init=True, config=SMALL["dac"], seed=3)
    assert torch.equal(torch.rand(3), expected)          # the caller's RNG is left alone


@pytest.mark.parametrize("bandwidth,levels", [(1.5, 2), (3.0, 4), (6.0, 8), (12.0, 16), (24.0, 32)])
def test_encodec_bandwidth_chooses_q(bandwidth, levels, speech):
    codec = load_codec("encodec", random_init=True, config=SMALL["encodec"], bandwidth=bandwidth)
    assert codec.num_quantizers == levels and codec.bandwidth == bandwidth
    wav, sr = speech
    assert codec.encode(wav[:, :4000], sr).shape[-1] == levels


def test_encodec_rejects_unknown_bandwidth_and_chunked_models():
    with pytest.raises(ValueError, match=r"bandwidth must be one of .*\[1.5, 3.0, 6.0, 12.0, 24.0\].*got 5.0"):
        load_codec("encodec", random_init=True, config=SMALL["encodec"], bandwidth=5.0)
    with pytest.raises(ValueError, match="per-chunk scales"):
        load_codec("encodec", random_init=True,
                   config=dict(SMALL["encodec"], chunk_length_s=1.0, overlap=0.01, normalize=True))


@pytest.mark.parametrize("name", ["dac", "mimi"])
def test_num_quantizers_keeps_the_first_levels(name, speech):
    wav, sr = speech
    full = load_codec(name, random_init=True, config=SMALL[name])
    part = load_codec(name, random_init=True, config=SMALL[name], num_quantizers=3)
    assert part.num_quantizers == 3
    wav = wav[:, :8000]
    assert torch.equal(part.encode(wav, sr), full.encode(wav, sr)[..., :3])
    with pytest.raises(ValueError, match=r"num_quantizers must be an integer in \[1, 6\] .* got 7"):
        load_codec(name, random_init=True, config=SMALL[name], num_quantizers=7)


def test_dac_pads_a_partial_last_frame(speech):
    codec = load_codec("dac", random_init=True, config=SMALL["dac"])
    for n in (1, 319, 320, 321):
        assert codec.encode(torch.zeros(n).uniform_(-0.1, 0.1), 16000).shape[1] == -(-n // 320)


def test_a_config_json_that_is_not_an_object_is_reported(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / "config.json").write_text(json.dumps([1, 2]))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a JSON object"):
        load_codec("mimi", path=d)


@pytest.mark.parametrize("content,match", [
    (b"[" * 100_000, "is not a model config: its JSON is nested too deeply"),
    (b'{"model_type": "mimi\xff"}', "is not a JSON object"),
])
def test_an_unreadable_config_json_is_reported(tmp_path, content, match):
    d = tmp_path / "w"
    d.mkdir()
    (d / "config.json").write_bytes(content)
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=match):
        load_codec("mimi", path=d)
