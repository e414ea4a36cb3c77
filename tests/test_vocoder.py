"""The melrvq codec's learned vocoder: the network, training, storage, loading and errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from soundstorm.cli import main as cli_main
from soundstorm.engine.codecs import load_codec
from soundstorm.engine.codecs.audio import read_audio
from soundstorm.engine.codecs.melrvq import MelRVQCodec
from soundstorm.engine.codecs.vocoder import MelVocoder, VocoderConfig
from soundstorm.training.codec_fit import fit_melrvq
from soundstorm.training.vocoder_fit import fit_vocoder

from speech import espeak_corpus

TINY = {"dim": 48, "intermediate_dim": 96, "layers": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six espeak-ng sentences; the first is held out."""
    return espeak_corpus(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def codec_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("codec") / "melrvq"
    fit_melrvq(corpus[1:], out, num_quantizers=4, codebook_size=32, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(corpus, codec_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocoded") / "melrvq"
    torch.set_num_threads(1)
    summary = fit_vocoder(codec_dir, corpus[1:], out_dir=out, steps=160, batch_size=8,
                          segment_frames=24, learning_rate=3e-3, config=TINY, progress=False)
    return out, summary


def lsd_db(a, b):
    """RMS log-spectral distance (dB) between two clips of the same length."""
    spec = lambda x: np.abs(np.fft.rfft(x[:len(x) // 512 * 512].reshape(-1, 512)  # noqa: E731
                                        * np.hanning(512), axis=1)) ** 2
    return float(np.sqrt(np.mean((10 * np.log10(spec(a) + 1e-8)
                                  - 10 * np.log10(spec(b) + 1e-8)) ** 2)))


@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 7), (3, 50)])
def test_the_network_makes_hop_samples_per_frame(batch, frames):
    net = MelVocoder(VocoderConfig(**TINY))
    wav = net(torch.randn(batch, frames, 80))
    assert wav.shape == (batch, frames * 320) and wav.dtype == torch.float32
    assert torch.isfinite(wav).all()
    assert net(torch.randn(2, 0, 80)).shape == (2, 0)
    # frames far apart do not see each other: a change at the end leaves the start alone
    x = torch.randn(1, 60, 80)
    y = x.clone()
    y[0, -1] += 3.0
    assert torch.allclose(net(x)[0, :320 * 20], net(y)[0, :320 * 20], atol=1e-5)


def test_the_network_and_its_config_reject_bad_input():
    net = MelVocoder(VocoderConfig(**TINY))
    with pytest.raises(ValueError, match=r"features must be log-mel frames \[B, T, 80\], got "
                                         r"shape \(2, 5, 64\)"):
        net(torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        VocoderConfig(kernel_size=6)
    with pytest.raises(ValueError, match="n_fft must be even and at least hop_length"):
        VocoderConfig(n_fft=256)
    with pytest.raises(ValueError, match="VocoderConfig.dim must be a positive integer"):
        VocoderConfig(dim=0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['width'\], missing field\(s\) "
                                         r"\['dim'\]"):
        VocoderConfig.from_dict({**{k: v for k, v in VocoderConfig().to_dict().items()
                                    if k != "dim"}, "width": 3})


def test_training_lowers_the_loss_and_the_codec_decodes_with_it(trained, corpus, codec_dir):
    out, summary = trained
    assert {"vocoder.safetensors", "vocoder-training.json", "vocoder-loss.png",
            "config.json", "codebooks.safetensors"} <= {p.name for p in out.iterdir()}
    assert summary["final_loss"] < 0.7 * summary["first_loss"]
    assert summary["levels"] == [0, 1, 2, 3, 4] and summary["clips"] == 5
    assert json.loads((out / "vocoder-training.json").read_text())["steps"] == 160

    codec = load_codec("melrvq", path=out)
    assert codec.decoder == "vocoder"
    assert load_codec("melrvq", path=codec_dir).decoder == "griffin-lim"
    x, _ = read_audio(corpus[0], 16000)  # held out of fitting and training
    tokens = codec.encode(torch.from_numpy(x)[None], 16000)
    y = codec.decode(tokens)[0].numpy()
    assert y.shape == (tokens.shape[1] * 320,) and np.isfinite(y).all()
    # the trained network is much closer to the speech than the same network untrained
    untrained = MelRVQCodec(codec.config, codec.codebooks,
                            vocoder=MelVocoder(VocoderConfig(**{**TINY, "n_mels": 80})))
    z = untrained.decode(tokens)[0].numpy()
    n = len(x)
    assert lsd_db(x, y[:n]) < 0.75 * lsd_db(x, z[:n])
    # Griffin-Lim stays available from the same directory
    gl = load_codec("melrvq", path=out, vocoder=False)
    assert gl.decoder == "griffin-lim" and gl.vocoder is None
    assert gl.decode(tokens).shape == (1, tokens.shape[1] * 320)


def test_save_and_load_give_the_same_decoding(trained, tmp_path):
    out, _ = trained
    codec = load_codec("melrvq", path=out)
    codec.save(tmp_path / "copy")
    again = load_codec("melrvq", path=tmp_path / "copy", vocoder=True)
    tokens = torch.randint(0, 32, (2, 9, 4))
    assert torch.equal(codec.decode(tokens), again.decode(tokens))
    # fewer levels: the same vocoder decodes the coarser codec
    coarse = load_codec("melrvq", path=out, num_quantizers=2)
    assert coarse.decoder == "vocoder" and coarse.decode(tokens[..., :2]).shape == (2, 9 * 320)


def test_training_is_seeded(corpus, codec_dir, tmp_path):
    kw = dict(steps=3, batch_size=2, segment_frames=16, config=TINY, progress=False)
    fit_vocoder(codec_dir, corpus[1:3], out_dir=tmp_path / "a", **kw)
    fit_vocoder(codec_dir, corpus[1:3], out_dir=tmp_path / "b", **kw)
    fit_vocoder(codec_dir, corpus[1:3], out_dir=tmp_path / "c", seed=1, **kw)
    a, b, c = (load_file(str(tmp_path / d / "vocoder.safetensors")) for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("kw,err,match", [
    ({"steps": 0}, ValueError, "steps must be an integer >= 1, got 0"),
    ({"levels": [5]}, ValueError, r"levels must be a non-empty list of integers in \[0, 4\]"),
    ({"levels": []}, ValueError, "levels must be a non-empty list"),
    ({"segment_frames": 100000}, ValueError, "no clip is at least segment_frames = 100000"),
    ({"learning_rate": 2.0}, ValueError, r"learning_rate must be in \(0, 1\)"),
    ({"config": VocoderConfig(n_mels=64)}, ValueError, "config has n_mels=64"),
    ({"config": 3}, TypeError, "config must be a VocoderConfig, a dict or None"),
])
def test_training_rejects_bad_arguments(corpus, codec_dir, tmp_path, kw, err, match):
    with pytest.raises(err, match=match):
        fit_vocoder(codec_dir, corpus[1:3], out_dir=tmp_path / "x", **{"steps": 2, **kw},
                    progress=False)
    assert not (tmp_path / "x").exists()


def test_loading_rejects_broken_vocoders(trained, codec_dir, tmp_path):
    out, _ = trained
    with pytest.raises(ValueError, match="has no vocoder .* soundstorm fit-vocoder"):
        load_codec("melrvq", path=codec_dir, vocoder=True)
    with pytest.raises(TypeError, match="vocoder must be None, True or False"):
        load_codec("melrvq", path=codec_dir, vocoder="yes")

    def broken(name, change):
        d = tmp_path / name
        load_codec("melrvq", path=out).save(d)
        change(d)
        return d

    d = broken("nofile", lambda d: (d / "vocoder.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match="names a vocoder but has no vocoder.safetensors"):
        load_codec("melrvq", path=d)
    assert load_codec("melrvq", path=d, vocoder=False).decoder == "griffin-lim"

    d = broken("garbage", lambda d: (d / "vocoder.safetensors").write_bytes(b"\x00" * 64))
    with pytest.raises(ValueError, match="vocoder.safetensors is not a valid safetensors file"):
        load_codec("melrvq", path=d)

    def reshape(d):
        w = load_file(str(d / "vocoder.safetensors"))
        w["head.bias"] = w["head.bias"][:10]
        save_file(w, str(d / "vocoder.safetensors"))
    with pytest.raises(ValueError, match="tensor 'head.bias' has shape \\(10,\\)"):
        load_codec("melrvq", path=broken("shape", reshape))

    def nan(d):
        w = load_file(str(d / "vocoder.safetensors"))
        w["embed.weight"][0, 0, 0] = float("nan")
        save_file(w, str(d / "vocoder.safetensors"))
    with pytest.raises(ValueError, match="tensor 'embed.weight' holds NaN"):
        load_codec("melrvq", path=broken("nan", nan))

    def layers(d):
        meta = json.loads((d / "config.json").read_text())
        meta["vocoder"]["layers"] = 3
        (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not fit the vocoder config: missing tensor\(s\) "
                                         r"\['blocks.2"):
        load_codec("melrvq", path=broken("layers", layers))

    def hop(d):
        meta = json.loads((d / "config.json").read_text())
        meta["vocoder"]["hop_length"] = 160
        (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="the vocoder takes 80 mel bands at a hop of 160"):
        load_codec("melrvq", path=broken("hop", hop))


def test_fit_vocoder_command(corpus, codec_dir, tmp_path, capsys):
    out = tmp_path / "cmd"
    assert cli_main(["fit-vocoder", str(codec_dir), *map(str, corpus[1:3]), "--out", str(out),
                     "--steps", "2", "--batch-size", "2", "--segment-frames", "16",
                     "--dim", "32", "--layers", "1", "--quiet"]) == 0
    assert "trained a vocoder" in capsys.readouterr().out
    assert load_codec("melrvq", path=out).vocoder.config.layers == 1
    with pytest.raises(SystemExit) as e:
        cli_main(["fit-vocoder", str(codec_dir), str(corpus[1]), "--out", str(tmp_path / "bad"),
                  "--steps", "0", "--quiet"])
    assert e.value.code == 2
    assert "steps must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
