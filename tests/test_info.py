"""`soundstorm info` runs the loader's checks on a model directory without building the
model, and fails in one line (exit status 2) on weights the engine would refuse."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from soundstorm.engine import ModelConfig, model as model_module
from soundstorm.cli import main


def info(capsys, *argv):
    code = main(["info", *[str(a) for a in argv]])
    return code, capsys.readouterr().out


def fails(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(["info", *[str(a) for a in argv]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_info_checks_the_weights_and_reports_the_checksum(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path)
    code, out = info(capsys, tmp_path, "--json")
    report = json.loads(out)
    assert code == 0 and report["weights_checksum"] == "verified"
    assert "torch" in report["cpu_backends"] and report["cpu_quantize"] == ["none", "int8"]
    assert report["parameters"] == tiny_model.num_parameters
    code, out = info(capsys, tmp_path)
    assert "checked; sha256 checksums verified" in out


def _edit(path, edit, metadata=None):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata=metadata)


def _nan(state):
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")


@pytest.mark.parametrize("spoil,match", [
    (lambda p: _edit(p, _nan), r"tensor 'blocks.0.attn.qkv.weight' holds 1 non-finite value"),
    (lambda p: _edit(p, lambda s: s.pop("head_bias")), "missing tensor 'head_bias'"),
    (lambda p: _edit(p, lambda s: s.__setitem__("norm.weight", torch.zeros(3))),
     r"tensor 'norm.weight' has shape \(3,\)"),
    (lambda p: _edit(p, lambda s: s.__setitem__("norm.weight", torch.zeros(64, dtype=torch.int32))),
     "tensor 'norm.weight' has dtype torch.int32"),
    (lambda p: p.write_bytes(_flip_a_mantissa_bit(p.read_bytes())),
     "tensor '.*' does not match the sha256 checksum"),
    (lambda p: p.unlink(), "model weights not found"),
    (lambda p: p.write_bytes(b"\0" * 16), "not a readable safetensors file"),
])
def test_info_fails_on_weights_the_engine_refuses(tmp_path, tiny_model, capsys, spoil, match):
    tiny_model.save_pretrained(tmp_path)
    spoil(tmp_path / "model.safetensors")
    err = fails(capsys, tmp_path)
    assert err.startswith("soundstorm info: error:") and re.search(match, err), err


def _flip_a_mantissa_bit(data):
    data = bytearray(data)
    data[-4] ^= 0x01            # the lowest mantissa bit of the last float32: still finite
    return bytes(data)


def test_info_on_a_config_beyond_the_limits_fails_in_one_line(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["depth"] = 10 ** 6
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "depth = 1000000 is above its limit 256" in fails(capsys, tmp_path)


def test_info_never_builds_the_model(tmp_path, capsys, monkeypatch):
    import dataclasses
    deep = dataclasses.replace(ModelConfig.preset("tiny"), depth=12)
    torch.manual_seed(0)
    model_module.SoundStorm(deep).save_pretrained(tmp_path)
    built = []
    real_init = model_module.ConformerBlock.__init__

    def counting_init(self, config):
        built.append(config.depth)
        real_init(self, config)

    monkeypatch.setattr(model_module.ConformerBlock, "__init__", counting_init)
    code, out = info(capsys, "paper", "--json")
    assert code == 0 and json.loads(out)["parameters"] == ModelConfig.preset("paper").num_parameters()
    assert built == []                         # the count is analytic
    code, out = info(capsys, tmp_path, "--json")
    assert code == 0 and json.loads(out)["parameters"] == deep.num_parameters()
    assert len(built) <= 1                     # one block's shapes on meta, never 12 blocks


def test_info_describes_a_text_model_directory_after_its_checks(tmp_path, capsys):
    from soundstorm.engine.text_model import TextModelConfig, TextToSemantic

    torch.manual_seed(0)
    model = TextToSemantic(TextModelConfig.preset("tiny", semantic_vocab_size=40))
    model.save_pretrained(tmp_path / "text")
    code, out = info(capsys, tmp_path / "text")
    params = sum(p.numel() for p in model.parameters())
    assert code == 0 and out.startswith(f"text-to-semantic model directory {tmp_path / 'text'}")
    assert f"parameters: {params:,}" in out and "semantic_vocab_size:40" in out
    code, out = info(capsys, tmp_path / "text", "--json")
    assert json.loads(out)["config"] == model.config.to_dict()
    weights = load_file(str(tmp_path / "text/model.safetensors"))
    weights.pop(next(iter(weights)))
    save_file(weights, str(tmp_path / "text/model.safetensors"))
    err = fails(capsys, tmp_path / "text")
    assert err.startswith("soundstorm info: error:") and "missing" in err, err
