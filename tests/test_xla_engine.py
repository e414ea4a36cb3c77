"""Choosing the XLA path: `Engine(..., backend="xla")`, the command line, and a clear error
without JAX."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("jax")

from soundstorm.engine import DecodeConfig, Engine  # noqa: E402
from soundstorm.engine.xla import XlaEngine  # noqa: E402
from soundstorm.kernels import get_ops  # noqa: E402

from conftest import random_codes, random_semantic  # noqa: E402
from test_cli import run_cli  # noqa: E402


def test_engine_with_backend_xla_is_an_xla_engine_from_a_directory(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    engine = Engine(tmp_path / "m", backend="xla")
    assert isinstance(engine, XlaEngine) and engine.backend == "xla"
    preset = Engine.from_preset("tiny", backend="xla", max_batch=3)
    assert isinstance(preset, XlaEngine) and preset.max_batch == 3
    cfg = tiny_model.config
    semantic = random_semantic(cfg, 2, 9)
    want = Engine(tmp_path / "m", backend="torch").generate(semantic, seed=3)
    assert torch.equal(engine.generate(semantic, seed=3), want)


def test_engine_arguments_that_do_not_apply_to_xla_are_refused(tiny_model):
    with pytest.raises(ValueError, match="backend 'xla' runs float32 or bfloat16 weights"):
        Engine(tiny_model, dtype="float16", backend="xla")
    assert Engine(tiny_model, dtype="bf16", backend="xla").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="device must be None or 'cpu'"):
        Engine(tiny_model, device="meta", backend="xla")
    with pytest.raises(ValueError, match="warmup does not apply"):
        Engine(tiny_model, backend="xla", warmup=True)
    with pytest.raises(ValueError, match="runs the whole decode, not torch ops"):
        get_ops("xla")


def test_without_jax_the_error_says_how_to_install_it(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(RuntimeError, match=r"needs JAX.*soundstorm\[xla\]"):
        Engine(tiny_model, backend="xla")


def test_on_step_sees_every_iteration_and_the_final_tokens(tiny_model):
    engine = XlaEngine(tiny_model)
    cfg = tiny_model.config
    seen = []
    out = engine.generate(random_semantic(cfg, 1, 8), prompt=random_codes(cfg, 1, 3, 4),
                          decode=DecodeConfig(steps_per_level=(3, 1, 2, 1)), seed=1,
                          on_step=lambda lvl, it, tok: seen.append((lvl, it, tok)))
    assert [(lvl, it) for lvl, it, _ in seen] == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1),
                                                   (3, 2), (4, 1)]
    assert torch.equal(seen[-1][2], out)
    assert torch.equal(out, engine.generate(random_semantic(cfg, 1, 8),
                                            prompt=random_codes(cfg, 1, 3, 4), seed=1,
                                            decode=DecodeConfig(steps_per_level=(3, 1, 2, 1))))


def test_long_form_stream_equals_the_torch_engines(tiny_model):
    cfg = tiny_model.config
    # longer than max_frames: several slide-and-prompt windows, the first one prompted
    semantic = random_semantic(cfg, 1, cfg.max_frames * cfg.semantic_rate // cfg.frame_rate + 7)
    prompt = random_codes(cfg, 1, 5, cfg.num_quantizers)
    kw = dict(prompt=prompt, seed=4, overlap=6)
    got = list(XlaEngine(tiny_model).stream(semantic, **kw))
    want = list(Engine(tiny_model, backend="torch").stream(semantic, **kw))
    assert len(got) == len(want) >= 2
    for a, b in zip(got, want):
        assert (a.index, a.start) == (b.index, b.start) and torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="long-form generation takes one utterance"):
        XlaEngine(tiny_model).stream(random_semantic(cfg, 2, 9))


def test_cli_generate_and_bench_with_backend_xla(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    cfg = tiny_model.config
    np.save(tmp_path / "sem.npy", random_semantic(cfg, 1, 12)[0].numpy())
    code, out, _ = run_cli(capsys, "generate", "--model", tmp_path / "model", "--semantic",
                        tmp_path / "sem.npy", "--seed", 4, "--backend", "xla", "--out",
                        tmp_path / "tok.npy", "--json", "--quiet")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["backend"] == "xla"
    want = Engine(tmp_path / "model", backend="torch").generate(
        random_semantic(cfg, 1, 12), seed=4)[0]
    np.testing.assert_array_equal(np.load(tmp_path / "tok.npy"), want.numpy())
    code, out, _ = run_cli(capsys, "bench", "--preset", "tiny", "--seconds", "0.4",
                        "--backend", "xla", "--repeats", 1, "--quiet", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["backend"] == "xla"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "generate", "--preset", "tiny", "--manifest", tmp_path / "x.jsonl",
             "--backend", "xla")
    assert exit_info.value.code == 2 and "--backend xla" in capsys.readouterr().err
