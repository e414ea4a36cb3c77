"""The engine's one step runner: rows stay resident while the batch does not change, every
pass of an engine shares its buffers, the device guard, warm-up and the memory estimate."""

import copy

import pytest
import torch

from conftest import make_model, random_codes, random_semantic
from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.engine.decode import reference_decode
from soundstorm.engine.runner import (ALL_MODES, StepMode, StepRunner, modes_for,
                                      step_activation_bytes)
from soundstorm.engine.scheduler import Scheduler

FAST = DecodeConfig(steps_per_level=(4, 2, 1, 1))


@pytest.fixture(scope="module")
def model(tiny_config):
    return make_model(tiny_config, seed=11, sharpen=20.0)


def count_calls(monkeypatch, obj, name):
    calls = []
    real = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def test_lockstep_generate_loads_its_rows_once(model, tiny_config, monkeypatch):
    engine = Engine(copy.deepcopy(model), dtype=torch.float64)
    loads = count_calls(monkeypatch, engine.runner, "_load")
    stages = count_calls(monkeypatch, engine.runner, "_stage")
    semantic = random_semantic(tiny_config, 3, 30, seed=1)
    prompt = random_codes(tiny_config, 3, 8, tiny_config.num_quantizers, seed=2)
    args = dict(semantic_lengths=[30, 11, 4], prompt=prompt, prompt_lengths=[8, 3, 0], seed=[1, 2, 3])
    out = engine.generate(semantic, **args)
    passes = 16 + tiny_config.num_quantizers - 1
    assert len(loads) == 1 and len(stages) == passes
    assert torch.equal(out, reference_decode(engine, engine.prepare(semantic, **args)))
    # The same engine again: the batch is new, so it is loaded once more, and only once.
    engine.generate(semantic, **args)
    assert len(loads) == 2


def test_passes_of_other_callers_between_steps_leave_every_request_intact(model, tiny_config):
    """A scheduler's requests resident in a bucket, then `generate` on the same engine
    (same runner, same bucket) between two of its steps: both decode as if alone."""
    engine = Engine(copy.deepcopy(model), dtype=torch.float64, max_batch=4)
    scheduler = Scheduler(engine, max_batch=4, threaded=False)
    requests = [dict(semantic=random_semantic(tiny_config, 1, 10 + 3 * i, seed=i)[0], seed=i,
                     decode=FAST) for i in range(3)]
    handles = [scheduler.submit(**r) for r in requests]
    generated = []
    while scheduler.in_flight:
        scheduler.step()
        semantic = random_semantic(tiny_config, 2, 12, seed=50 + len(generated))
        generated.append((semantic, engine.generate(semantic, decode=FAST, seed=7)))
    assert scheduler.runner is engine.runner
    for r, h in zip(requests, handles):
        want = reference_decode(engine, engine.prepare(r["semantic"][None], decode=FAST, seed=r["seed"]))[0]
        assert torch.equal(h.result(), want)
    for semantic, out in generated:
        assert torch.equal(out, reference_decode(engine, engine.prepare(semantic, decode=FAST, seed=7)))


def test_every_caller_shares_the_engines_runner(model):
    engine = Engine(copy.deepcopy(model))
    assert engine.scheduler.runner is engine.runner
    assert Scheduler(engine, threaded=False).runner is engine.runner
    engine.scheduler.close()


def test_generate_uses_the_engines_batch_buckets(model, tiny_config):
    engine = Engine(copy.deepcopy(model), max_batch=8)
    engine.generate(random_semantic(tiny_config, 3, 10), decode=DecodeConfig(steps_per_level=(1, 1, 1, 1)), seed=0)
    assert [B for B, _ in engine.runner.buffers] == [4]


def test_warmup_allocates_every_bucket_and_names_the_modes(model, tiny_config):
    engine = Engine(copy.deepcopy(model), max_batch=4)
    report = engine.warmup()
    assert set(engine.runner.buffers) == {(b, t) for b in (1, 2, 4) for t in (64, 128, 256)}
    assert report["modes"] == [StepMode(True, False, True), StepMode(False, True, False)]
    assert report["graphs"] == 0 and report["pool_bytes"] is None     # CPU: nothing to capture
    assert report["pool_bytes_estimate"] == step_activation_bytes(
        tiny_config, 4, 256, torch.float32, engine.backend)
    small = Engine(copy.deepcopy(model), max_batch=2).warmup(max_frames=70)
    assert small["buckets"] == [(1, 64), (1, 128), (2, 64), (2, 128)]
    with pytest.raises(ValueError, match=r"max_frames must be an int in 1..256"):
        engine.warmup(max_frames=257)
    with pytest.raises(ValueError, match="batch_sizes must be ints >= 1"):
        engine.warmup(batch_sizes=[0])
    with pytest.raises(TypeError, match="decodes must be DecodeConfigs"):
        engine.warmup(decodes=[(16, 1)])
    Engine(copy.deepcopy(model), max_batch=2, warmup=True)


def test_modes_cover_what_mixed_passes_produce():
    assert modes_for([DecodeConfig(steps_per_level=(3, 1), temperature=0.0)], 2) == [
        StepMode(False, False, True), StepMode(False, True, False)]
    every = modes_for([DecodeConfig(steps_per_level=(3, 2)),
                       DecodeConfig(steps_per_level=(3, 2), temperature=0.0, gumbel_scale=0.0),
                       DecodeConfig(steps_per_level=(3, 2), temperature=0.0),
                       DecodeConfig(steps_per_level=(3, 2), greedy_last=False, gumbel_scale=0.0)], 2)
    assert set(every) == {m for m in ALL_MODES if not (m.keep_all and m.noise)}


def test_activation_estimate_scales_with_the_bucket():
    cfg = ModelConfig.preset("paper")
    one = step_activation_bytes(cfg, 1, 1500, torch.bfloat16, "triton")
    assert step_activation_bytes(cfg, 8, 1500, torch.bfloat16, "triton") == 8 * one
    assert step_activation_bytes(cfg, 1, 1500, torch.float32, "triton") == 2 * one
    # the reference's resampling materialises [T, C] temporaries the kernels never write
    assert step_activation_bytes(cfg, 1, 1500, torch.bfloat16, "torch") > one


def test_the_device_guard_names_the_engines_device(model):
    runner = StepRunner(Engine(copy.deepcopy(model)))
    runner.device = torch.device("cuda", 1)      # as for an engine on the second GPU
    guard = runner.device_guard()
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with pytest.raises(ValueError, match="use_cuda_graphs=True needs a CUDA device"):
        StepRunner(Engine(copy.deepcopy(model)), use_cuda_graphs=True)


def test_prepare_stays_on_the_host(model, tiny_config):
    engine = Engine(copy.deepcopy(model))
    batch = engine.prepare(random_semantic(tiny_config, 2, 9), prompt=random_codes(
        tiny_config, 2, 4, tiny_config.num_quantizers))
    assert {t.device.type for t in (batch.semantic, batch.tokens, batch.frame_valid, batch.seeds)} == {"cpu"}
    with pytest.raises(ValueError, match="semantic is on the meta device"):
        engine.prepare(torch.zeros(1, 9, dtype=torch.long, device="meta"))


def test_warmup_prepares_a_bounded_number_of_buckets(model, tiny_config, monkeypatch):
    import dataclasses
    from soundstorm.engine import engine as engine_module
    long = dataclasses.replace(tiny_config, max_frames=2 ** 16)       # 258 length buckets
    engine = Engine(make_model(long), max_batch=2)
    allocated = count_calls(monkeypatch, engine.runner, "buffers_for")
    with pytest.raises(ValueError, match=r"warmup would prepare 516 buckets \(2 batch sizes x "
                                         r"258 lengths up to 65536 frames\), more than "
                                         r"MAX_WARMUP_BUCKETS=256; pass max_frames="):
        engine.warmup()
    assert allocated == []                                            # refused before any work
    report = engine.warmup(max_frames=600)
    assert report["buckets"] == [(b, t) for b in (1, 2) for t in (64, 128, 256, 512, 768)]
    with pytest.raises(ValueError, match=r"batch size 65 in batch_sizes is larger than any pass "
                                         r"of this engine \(max_generate_rows=64\)"):
        engine.warmup(batch_sizes=[1, 65], max_frames=64)
    monkeypatch.setattr(engine_module, "MAX_WARMUP_BUCKETS", 4)
    with pytest.raises(ValueError, match="warmup would prepare 6 buckets"):
        Engine(copy.deepcopy(model), max_batch=2).warmup()
