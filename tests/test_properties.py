"""Property-based robustness: whatever a careless or hostile caller passes - to `generate`,
`submit`, `generate_many`, `generate_long`, in a model's config.json or safetensors file,
in a corpus manifest or shard, or on the command line - the result is either a correct
result or a clear ValueError / TypeError / FileNotFoundError (a one-line error and exit 2
on the command line), within seconds. Nothing crashes deep in torch, hangs, or returns
garbage.

Every case is counted by outcome (`OUTCOMES`); `pytest -s tests/test_properties.py`
prints the counts at the end."""

from __future__ import annotations

import collections
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from soundstorm.engine import DecodeConfig, Engine, ModelConfig, SoundStorm

CLEAR = (ValueError, TypeError, FileNotFoundError)
OUTCOMES: collections.Counter = collections.Counter()
FAST = settings(max_examples=60, deadline=10_000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    total = sum(OUTCOMES.values())
    print(f"\nproperty cases: {total} ({dict(sorted(OUTCOMES.items()))})")


def tiny_config(**changes) -> ModelConfig:
    fields = ModelConfig.preset("tiny").to_dict()
    fields.update(max_frames=64, **changes)
    return ModelConfig(**fields)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(SoundStorm(tiny_config()).eval(), max_batch=4)


def outcome(fn, kind: str):
    """Run fn(): its result, or None after a clear error; anything else fails the test."""
    try:
        result = fn()
    except CLEAR as error:
        message = str(error)
        assert message and "\n" not in message.strip() or len(message) < 2000, message
        OUTCOMES[f"{kind}: clear error"] += 1
        return None
    OUTCOMES[f"{kind}: result"] += 1
    return result


# -- decoding inputs ----------------------------------------------------------------------
DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]


def id_tensors(max_len=40, valid_shape=None):
    """(shape, dtype, high, seed): half the time a well-formed tensor of ids (`valid_shape`
    draws its shape, values in 0..high-1), otherwise any shape, dtype and values."""
    anything = st.tuples(st.lists(st.integers(0, max_len), min_size=0, max_size=4).map(tuple),
                         st.sampled_from(DTYPES), st.integers(-3, 40), st.integers(0, 2 ** 16))
    if valid_shape is None:
        return anything
    good = st.tuples(valid_shape, st.sampled_from([torch.int64, torch.int32]),
                     st.just(None), st.integers(0, 2 ** 16))
    return st.one_of(good, anything)


def make_tensor(spec, vocab: int = 16):
    shape, dtype, high, seed = spec
    g = torch.Generator().manual_seed(seed)
    if high is None:                      # well-formed: ids in 0..vocab-1
        return torch.randint(0, vocab, shape, generator=g).to(dtype)
    t = torch.randint(-1, max(high, 0) + 1, shape, generator=g) if shape else torch.tensor(high)
    return t.to(dtype)


SEMANTIC = st.tuples(st.integers(1, 3), st.integers(1, 30))
PROMPT = st.tuples(st.integers(1, 3), st.integers(0, 12), st.just(4))


decodes = st.one_of(
    st.none(),
    st.builds(DecodeConfig,
              steps_per_level=st.one_of(st.none(), st.lists(st.integers(-1, 6), min_size=0,
                                                            max_size=5).map(tuple)),
              temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
              gumbel_scale=st.floats(-2, 10, allow_nan=True)),
)


def check_tokens(out, engine, semantic, prompt):
    cfg = engine.config
    assert out.dtype == torch.int64 and out.ndim == 3 and out.shape[2] == cfg.num_quantizers
    real = out[out >= 0]
    assert (real < cfg.codebook_size).all(), "a MASK or out-of-range code was returned"
    assert ((out == -1) | (out >= 0)).all()
    if prompt is not None and prompt.ndim == 3 and prompt.shape[1]:
        P = prompt.shape[1]
        assert torch.equal(out[:, :P], prompt.to(torch.int64)), "prompt frames changed"


def _safe_build(decode_fn):
    try:
        return decode_fn()
    except CLEAR:
        OUTCOMES["decode config: clear error"] += 1
        return "invalid"


@FAST
@given(semantic=id_tensors(valid_shape=SEMANTIC),
       prompt=st.one_of(st.none(), id_tensors(30, valid_shape=PROMPT)),
       seed=st.one_of(st.none(), st.integers(0, 2 ** 40), st.integers(-5, 2 ** 64),
                      st.text(max_size=2)),
       decode=st.one_of(st.none(), st.builds(
           DecodeConfig, steps_per_level=st.just((2, 1, 1, 1)),
           temperature=st.sampled_from([1.0, 0.0, 0.5]))))
def test_generate_gives_tokens_or_a_clear_error(engine, semantic, prompt, seed, decode):
    sem = make_tensor(semantic)
    pr = None if prompt is None else make_tensor(prompt, vocab=32)
    out = outcome(lambda: engine.generate(sem, prompt=pr, seed=seed, decode=decode), "generate")
    if out is not None:
        check_tokens(out, engine, sem, pr)


@FAST
@given(data=st.data())
def test_decode_configs_are_checked(engine, data):
    def build():
        return DecodeConfig(
            steps_per_level=data.draw(st.one_of(st.none(), st.lists(
                st.one_of(st.integers(-2, 5), st.floats(0, 3), st.booleans()), max_size=5).map(tuple))),
            temperature=data.draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                            st.integers(-1, 3), st.just("1.0"))),
            gumbel_scale=data.draw(st.one_of(st.floats(allow_nan=True), st.integers(-1, 3))))
    decode = outcome(build, "decode config")
    if decode is None:
        return
    sem = torch.zeros(1, 6, dtype=torch.long)
    out = outcome(lambda: engine.generate(sem, decode=decode, seed=1), "generate with config")
    if out is not None:
        check_tokens(out, engine, sem, None)


@FAST
@given(requests=st.lists(st.fixed_dictionaries(
    {"semantic": id_tensors(30, valid_shape=st.tuples(st.integers(1, 30)))},
    optional={"prompt": st.one_of(id_tensors(20, valid_shape=st.tuples(st.integers(0, 10), st.just(4))),
                                  st.just(""), st.none()),
              "seed": st.one_of(st.integers(0, 2 ** 40), st.just(-1), st.floats(0, 1)),
              "extra": st.integers()}), max_size=4))
def test_generate_many_gives_tokens_or_a_clear_error(engine, requests):
    built = []
    for r in requests:
        r = dict(r)
        r["semantic"] = make_tensor(r["semantic"])
        if isinstance(r.get("prompt"), tuple):
            r["prompt"] = make_tensor(r["prompt"], vocab=32)
        r["decode"] = DecodeConfig(steps_per_level=(1, 1, 1, 1))
        built.append(r)
    outs = outcome(lambda: engine.generate_many(built), "generate_many")
    if outs is not None:
        assert len(outs) == len(built)
        for out in outs:
            assert out.ndim == 2 and ((out >= 0) & (out < engine.config.codebook_size)).all()


@FAST
@given(semantic=id_tensors(30, valid_shape=st.tuples(st.integers(1, 30))),
       prompt=st.one_of(st.none(), id_tensors(10, valid_shape=st.tuples(st.integers(0, 10), st.just(4)))),
       seed=st.one_of(st.none(), st.integers(0, 100), st.just(True)))
def test_submit_gives_tokens_or_a_clear_error(engine, semantic, prompt, seed):
    sem, pr = make_tensor(semantic), None if prompt is None else make_tensor(prompt, vocab=32)
    handle = outcome(lambda: engine.submit(sem, prompt=pr, seed=seed,
                                           decode=DecodeConfig(steps_per_level=(1, 1, 1, 1))),
                     "submit")
    if handle is not None:
        out = handle.result(timeout=30)
        assert out.ndim == 2 and ((out >= 0) & (out < engine.config.codebook_size)).all()


@settings(max_examples=25, deadline=30_000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(length=st.integers(-2, 200), window=st.one_of(st.none(), st.integers(-1, 80)),
       overlap=st.one_of(st.none(), st.integers(-1, 70)), prompt=st.integers(0, 12))
def test_generate_long_gives_tokens_or_a_clear_error(engine, length, window, overlap, prompt):
    cfg = engine.config
    sem = torch.randint(0, cfg.semantic_vocab_size, (max(length, 0),))
    pr = torch.randint(0, cfg.codebook_size, (prompt, cfg.num_quantizers)) if prompt else None
    out = outcome(lambda: engine.generate_long(sem, prompt=pr, window=window, overlap=overlap,
                                               seed=3, decode=DecodeConfig(steps_per_level=(1, 1, 1, 1))),
                  "generate_long")
    if out is not None:
        assert out.shape == (cfg.frames_for(length), cfg.num_quantizers)
        assert ((out >= 0) & (out < cfg.codebook_size)).all()
        if pr is not None:
            assert torch.equal(out[:prompt], pr)


# -- model files --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(1)
    SoundStorm(tiny_config()).save_pretrained(directory)
    return directory


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10 ** 13, 10 ** 13),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


@FAST
@given(field=st.sampled_from(sorted(ModelConfig.preset("tiny").to_dict()) + ["format", "format_version"])
       | st.text(max_size=6),
       value=json_values, drop=st.booleans())
def test_config_json_fields_load_or_fail_clearly(saved_model, tmp_path_factory, field, value, drop):
    directory = tmp_path_factory.mktemp("cfg")
    for name in ("model.safetensors",):
        (directory / name).write_bytes((saved_model / name).read_bytes())
    config = json.loads((saved_model / "config.json").read_text())
    target = config if field in ("format", "format_version") else config["model"]
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (directory / "config.json").write_text(json.dumps(config))
    model = outcome(lambda: SoundStorm.from_pretrained(directory), "config.json")
    if model is not None:
        # Loaded: only a change the model ignores (an unknown key) or an equal value.
        assert model.config == SoundStorm.from_pretrained(saved_model).config


@FAST
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 10 ** 7), st.integers(1, 255)),
                                                 max_size=3),
       header=st.one_of(st.none(), json_values, st.binary(max_size=40)))
def test_safetensors_headers_and_data_load_or_fail_clearly(saved_model, tmp_path_factory, cut, flips, header):
    directory = tmp_path_factory.mktemp("st")
    (directory / "config.json").write_text((saved_model / "config.json").read_text())
    data = bytearray((saved_model / "model.safetensors").read_bytes())
    if header is not None:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        data = bytearray(struct.pack("<Q", len(raw))) + bytearray(raw) + data[8 + n:]
    for position, xor in flips:
        data[position % len(data)] ^= xor
    if cut:
        data = data[:max(0, len(data) - cut * 37)]
    (directory / "model.safetensors").write_bytes(bytes(data))
    model = outcome(lambda: SoundStorm.from_pretrained(directory), "safetensors")
    if model is not None:
        # Loaded: it must be the untouched model (a change that slipped through is garbage).
        reference = SoundStorm.from_pretrained(saved_model)
        for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
            assert torch.isfinite(a).all(), k
            assert torch.equal(a, b), f"{k} differs from the saved weights but loaded"


# -- corpora --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from soundstorm.training.corpus import write_corpus

    directory = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    utterances = [{"id": f"u{i}", "acoustic": rng.integers(0, 32, (20 + i, 4)),
                   "semantic": rng.integers(0, 16, ((19 + i) // 2 + 1,))} for i in range(6)]
    write_corpus(directory, utterances, num_quantizers=4, codebook_size=32,
                 semantic_vocab_size=16, frame_rate=50, semantic_rate=25)
    return directory


@FAST
@given(line=st.integers(0, 10), value=st.one_of(json_values, st.binary(max_size=30)),
       shard_cut=st.integers(0, 3), shard_bytes=st.binary(max_size=64))
def test_corpus_manifests_and_shards_open_or_fail_clearly(corpus, tmp_path_factory, line, value,
                                                          shard_cut, shard_bytes):
    from soundstorm.training.corpus import open_corpus

    directory = tmp_path_factory.mktemp("c")
    for path in corpus.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    manifest = directory / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines()
    new = value if isinstance(value, bytes) else json.dumps(value).encode()
    if line < len(lines):
        lines[line] = new
    else:
        lines.append(new)
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    shards = sorted(directory.glob("*.npy"))
    if shard_cut and shards:
        shard = shards[shard_cut % len(shards)]
        shard.write_bytes(shard.read_bytes()[:len(shard_bytes) + 10] + shard_bytes)

    def read_all():
        c = open_corpus(directory)
        for i in range(len(c)):
            a, s = c.read(i, 0, 5)
            assert a.ndim == 2 and s.ndim == 1
        return c

    outcome(read_all, "corpus")


# -- the command line -------------------------------------------------------------------------
ARGS = st.lists(st.one_of(
    st.sampled_from(["--preset", "tiny", "--seconds", "--batch", "--steps", "--seed", "--out",
                     "--device", "cpu", "cuda", "--backend", "triton", "torch", "--dtype",
                     "float64", "nan", "inf", "-1", "0", "1", "0.5", "", "--prompt", "--semantic",
                     "/nonexistent/x.npy", "/proc/x", "--manifest", "--json", "--quiet"]),
    st.text(alphabet="abc-0123456789./", max_size=6)), max_size=7)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(["generate", "info", "bench", "tokenize", "train", "fit-codec"]),
       args=ARGS)
def test_command_line_arguments_end_in_a_result_or_a_one_line_error(tmp_path, command, args):
    assume(not any(a in ("--help", "-h") for a in args))
    if command == "bench" and "--preset" not in args:
        args = args + ["--preset", "tiny", "--seconds", "0.2", "--repeats", "1"]
    r = subprocess.run([sys.executable, "-m", "soundstorm.cli", command, *args],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if r.returncode == 0:
        OUTCOMES["command line: result"] += 1
        return
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines and (len(lines) == 1 or lines[0].startswith("usage:")), r.stderr[-2000:]
    OUTCOMES["command line: clear error"] += 1
