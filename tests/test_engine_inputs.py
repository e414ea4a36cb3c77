"""Bad input raises ValueError/TypeError naming the argument, the value and what was
expected, before any work starts."""

import numpy as np
import pytest
import torch

from soundstorm.engine import DecodeConfig, Engine, SoundStorm
from soundstorm.kernels import available_backends

from conftest import random_codes, random_semantic


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, backend="torch")


def sem(engine, B=2, S=10):
    return random_semantic(engine.config, B, S)


def prm(engine, B=2, P=4, Q=None):
    return random_codes(engine.config, B, P, Q or engine.config.num_quantizers)


CASES = [
    # (kwargs builder, exception, message)
    (lambda e: dict(semantic=sem(e).numpy()), TypeError, "semantic must be a torch.Tensor"),
    (lambda e: dict(semantic=sem(e).float()), TypeError, "semantic must hold integer ids, got dtype torch.float32"),
    (lambda e: dict(semantic=sem(e)[0]), ValueError, r"semantic must be 2-D \[B, S\], got shape \(10,\)"),
    (lambda e: dict(semantic=torch.zeros(2, 0, dtype=torch.long)), ValueError, "semantic is empty"),
    (lambda e: dict(semantic=torch.zeros(0, 5, dtype=torch.long)), ValueError, "semantic is empty"),
    (lambda e: dict(semantic=sem(e).index_put((torch.tensor([1]), torch.tensor([3])), torch.tensor(16))),
     ValueError, r"semantic\[1, 3\] = 16 is out of range; expected ids in 0..15"),
    (lambda e: dict(semantic=sem(e).index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(-2))),
     ValueError, r"semantic\[0, 0\] = -2 is out of range"),
    (lambda e: dict(semantic=sem(e), semantic_lengths=torch.tensor([10, 11])), ValueError,
     r"semantic_lengths\[1\] = 11 is out of range; expected 1..10"),
    (lambda e: dict(semantic=sem(e), semantic_lengths=torch.tensor([10, 0])), ValueError,
     r"semantic_lengths\[1\] = 0 is out of range"),
    (lambda e: dict(semantic=sem(e), semantic_lengths=torch.tensor([10])), ValueError,
     "semantic_lengths has 1 entries, expected one per row"),
    (lambda e: dict(semantic=sem(e), semantic_lengths=torch.tensor([10.0, 5.0])), TypeError,
     "semantic_lengths must be integers"),
    (lambda e: dict(semantic=sem(e, S=200)), ValueError,
     "asks for 400 frames, more than the model's max_frames=256 .*generate_long"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e, Q=3)), ValueError,
     r"prompt has 3 RVQ levels .* the model has 4"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e)[0]), ValueError, r"prompt must be 3-D \[B, P, Q\]"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e, B=3)), ValueError, "prompt has batch size 3, semantic has 2"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e).double()), TypeError, "prompt must hold integer ids"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e, P=21)), ValueError,
     "prompt row 0 has 21 frames, longer than the 20 frames"),
    (lambda e: dict(semantic=sem(e), semantic_lengths=[10, 2], prompt=prm(e, P=5)), ValueError,
     "prompt row 1 has 5 frames, longer than the 4 frames"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e).index_put((torch.tensor([1]), torch.tensor([2]), torch.tensor([3])), torch.tensor(32))),
     ValueError, r"prompt\[1, 2, 3\] = 32 is out of range; expected ids in 0..31"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e), prompt_lengths=torch.tensor([5, 1])), ValueError,
     r"prompt_lengths\[0\] = 5 is out of range; expected 0..4"),
    (lambda e: dict(semantic=sem(e), prompt_lengths=torch.tensor([1, 1])), ValueError,
     "prompt_lengths was given without a prompt"),
    (lambda e: dict(semantic=sem(e), decode=DecodeConfig(steps_per_level=(4, 1, 1))), ValueError,
     r"decode.steps_per_level has 3 entries .* the model has 4 RVQ levels"),
    (lambda e: dict(semantic=sem(e), decode={"temperature": 1.0}), TypeError, "decode must be a DecodeConfig"),
    (lambda e: dict(semantic=sem(e), seed=-1), ValueError, r"seed\[0\] = -1; seeds must be ints in 0..2\*\*63-1"),
    (lambda e: dict(semantic=sem(e), seed=2 ** 63), ValueError, "seeds must be ints"),
    (lambda e: dict(semantic=sem(e), seed=1.5), TypeError, "seed must be an int"),
    (lambda e: dict(semantic=sem(e), seed=[1, 2, 3]), ValueError, "seed has 3 entries, expected one per row"),
    (lambda e: dict(semantic=sem(e), on_step="print"), TypeError, "on_step must be callable"),
    # meta tensors hold no values: every tensor argument says so
    (lambda e: dict(semantic=sem(e).to("meta")), ValueError, "semantic is on the meta device"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e).to("meta")), ValueError, "prompt is on the meta device"),
    (lambda e: dict(semantic=sem(e), semantic_lengths=torch.tensor([10, 9], device="meta")), ValueError,
     "semantic_lengths is on the meta device"),
    (lambda e: dict(semantic=sem(e), prompt=prm(e), prompt_lengths=torch.tensor([4, 4], device="meta")),
     ValueError, "prompt_lengths is on the meta device"),
    (lambda e: dict(semantic=sem(e), seed=torch.tensor([1, 2], device="meta")), ValueError,
     "seed is on the meta device"),
    # unsigned 64-bit values are shown as they are, not wrapped to negative int64
    (lambda e: dict(semantic=_uint64(sem(e), (1, 3), 2 ** 64 - 1)), ValueError,
     r"semantic\[1, 3\] = 18446744073709551615 is out of range; expected ids in 0..15"),
    (lambda e: dict(semantic=sem(e), prompt=_uint64(prm(e), (0, 2, 1), 2 ** 63)), ValueError,
     r"prompt\[0, 2, 1\] = 9223372036854775808 is out of range"),
    (lambda e: dict(semantic=sem(e), seed=torch.from_numpy(np.array([1, 2 ** 64 - 1], dtype=np.uint64))),
     ValueError, r"seed\[1\] = 18446744073709551615; seeds must be ints"),
]


def _uint64(ids, where, value):
    a = ids.numpy().astype(np.uint64)
    a[where] = value
    return torch.from_numpy(a)


@pytest.mark.parametrize("build,exc,match", CASES)
def test_bad_input_is_rejected_with_a_clear_message(engine, build, exc, match):
    with pytest.raises(exc, match=match):
        engine.generate(**build(engine))


def test_semantic_too_short_for_one_frame():
    from soundstorm.engine import ModelConfig
    from conftest import make_model
    cfg = ModelConfig.preset("tiny", semantic_rate=50, frame_rate=12.5)
    engine = Engine(make_model(cfg))
    with pytest.raises(ValueError, match="semantic row 0 has 3 ids, which make no codec frame.*at least 4"):
        engine.generate(random_semantic(cfg, 1, 3))
    assert engine.generate(random_semantic(cfg, 1, 9), seed=0).shape == (1, 2, 4)


def test_padding_past_the_lengths_may_hold_anything(engine):
    s = sem(engine)
    s[1, 6:] = -7
    p = prm(engine)
    p[1, 2:] = 999
    out = engine.generate(s, semantic_lengths=[10, 6], prompt=p, prompt_lengths=[4, 2], seed=0)
    assert (out[1, 12:] == -1).all() and torch.equal(out[1, :2], p[1, :2])


def test_prompt_as_long_as_the_target_is_returned_unchanged(engine):
    p = prm(engine, P=20)
    out = engine.generate(sem(engine), prompt=p, seed=0)
    assert torch.equal(out, p)


def test_other_integer_dtypes_are_accepted(engine):
    s = sem(engine)
    a = engine.generate(s.int(), prompt=prm(engine).to(torch.int16), seed=3)
    b = engine.generate(s, prompt=prm(engine), seed=3)
    assert torch.equal(a, b)


def test_engine_construction_errors(tmp_path, tiny_config):
    with pytest.raises(TypeError, match="model_or_dir must be a SoundStorm model or a model directory"):
        Engine(42)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        Engine(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Engine.from_preset("tiny", dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        Engine.from_preset("tiny", backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown backend 'pallas'"):
        Engine.from_preset("tiny", backend="pallas")
    with torch.device("meta"):
        meta = SoundStorm(tiny_config)
    with pytest.raises(ValueError, match="meta device"):
        Engine(meta)


def test_engine_from_directory(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    a = Engine(tmp_path, dtype="float64")
    assert a.dtype == torch.float64 and a.backend == available_backends(torch.device("cpu"))[0]
    b = Engine(tiny_model, dtype=torch.float64)
    s = random_semantic(a.config, 2, 7)
    assert torch.equal(a.generate(s, seed=5), b.generate(s, seed=5))


def test_uint64_ids_in_range_are_accepted(engine):
    s = sem(engine)
    assert torch.equal(engine.generate(_uint64(s, (0, 0), int(s[0, 0])), seed=4),
                       engine.generate(s, seed=4))


def test_generate_many_names_the_request_that_is_wrong(engine):
    ok = {"semantic": sem(engine, B=1)[0], "seed": 1}
    Q = engine.config.num_quantizers
    cases = [
        ({"semantic": sem(engine, B=1)[0], "prompt": ""}, TypeError,
         r"requests\[1\]: prompt must be a torch.Tensor .*got str ''"),
        ({"semantic": sem(engine, B=1)[0], "prompt": [[1] * Q]}, TypeError,
         r"requests\[1\]: prompt must be a torch.Tensor"),
        ({"semantic": torch.full((5,), 16)}, ValueError,
         r"requests\[1\]: semantic\[0, 0\] = 16 is out of range"),
        ({"semantic": sem(engine, B=1)[0], "seed": "7"}, TypeError, r"requests\[1\]: seed must be an int"),
        ({"semantic": sem(engine, B=1)[0], "decode": ""}, TypeError,
         r"requests\[1\]: decode must be a DecodeConfig"),
    ]
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            engine.generate_many([ok, bad, ok])


def test_a_prompt_of_zero_frames_is_no_prompt(engine):
    s = sem(engine, B=1)[0]
    empty = torch.zeros(0, engine.config.num_quantizers, dtype=torch.long)
    with_empty, without = engine.generate_many([{"semantic": s, "prompt": empty, "seed": 2},
                                                {"semantic": s, "prompt": None, "seed": 2}])
    assert torch.equal(with_empty, without)


def test_large_batches_are_decoded_in_chunks_with_the_same_tokens(tiny_model):
    import copy
    cfg = tiny_model.config
    whole = Engine(copy.deepcopy(tiny_model), dtype=torch.float64, max_batch=2)
    assert whole.max_generate_rows == 64
    chunked = Engine(copy.deepcopy(tiny_model), dtype=torch.float64, max_batch=2)
    chunked.max_generate_rows = 2
    args = dict(semantic=random_semantic(cfg, 5, 14, seed=8), semantic_lengths=[14, 3, 9, 14, 1],
                prompt=random_codes(cfg, 5, 6, cfg.num_quantizers, seed=9),
                prompt_lengths=[6, 0, 2, 5, 1], seed=[11, 12, 13, 14, 15],
                decode=DecodeConfig(steps_per_level=(3, 2, 1, 1)))
    seen = {"whole": [], "chunked": []}
    a = whole.generate(**args, on_step=lambda l, i, t: seen["whole"].append((l, i, t.clone())))
    b = chunked.generate(**args, on_step=lambda l, i, t: seen["chunked"].append((l, i, t.clone())))
    assert torch.equal(a, b)
    assert [(l, i) for l, i, _ in seen["chunked"]] == [(l, i) for l, i, _ in seen["whole"]]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(seen["whole"], seen["chunked"]))
    assert max(B for B, _ in chunked.runner.buffers) == 2       # no pass held more rows
    assert torch.equal(chunked.generate(**args), a)             # without on_step: chunk by chunk
