"""The decoding step is capture-safe: every step mode of the runner (sampled, greedy,
keep-all, with and without noise) on ragged, prompted batches runs under a dispatch mode
that fails on any host sync, host/device copy or tensor made from a Python value - on CPU
tensors, on the meta device (where any host tensor the step reads shows up), with the
torch backend and with the Triton kernels. And the guard does catch such ops: the step as
it used to be, with Python values for noise and sample, fails it."""

import _triton_setup  # noqa: F401  (must come first: picks interpreter or GPU)
from _triton_setup import DEVICE

import copy
import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import make_model, random_codes, random_semantic
from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.engine.capture import CaptureGuard, CaptureViolation, check_step_modes
from soundstorm.engine.decode import reference_decode
from soundstorm.engine.runner import ALL_MODES, StepMode
from soundstorm.engine.scheduler import Scheduler

# Between them these reach every mode a plan can produce (keep-all with noise cannot
# occur: the noise is annealed to 0 at a level's last iteration).
DECODES = [
    DecodeConfig(steps_per_level=(4, 1, 1, 1)),                                  # (T,F,T) (F,T,F)
    DecodeConfig(steps_per_level=(3, 2, 1, 1), temperature=0.0),                 # (F,F,T)
    DecodeConfig(steps_per_level=(3, 1, 2, 1), gumbel_scale=0.0),                # (T,F,F)
    DecodeConfig(steps_per_level=(2, 2, 1, 1), greedy_last=False),               # (T,T,F)
    DecodeConfig(steps_per_level=(3, 1, 1, 2), temperature=0.0, gumbel_scale=0.0),  # (F,F,F)
]
REACHABLE = {m for m in ALL_MODES if not (m.keep_all and m.noise)}


def requests_for(cfg, n=7, seed=0):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        S = rnd.randint(1, 24)
        r = {"semantic": random_semantic(cfg, 1, S, seed=100 + i)[0], "seed": i,
             "decode": DECODES[i % len(DECODES)]}
        if i % 2:
            r["prompt"] = random_codes(cfg, rnd.randint(1, S), cfg.num_quantizers, seed=i)
        out.append(r)
    return out


def guard_steps(monkeypatch, runner):
    """Run every step of `runner` under a CaptureGuard; returns {mode: ops checked}."""
    seen = {}
    real = runner._step

    def step(buf, mode):
        with CaptureGuard(runner.device, f"the step in mode {mode}") as guard:
            real(buf, mode)
        seen[mode] = seen.get(mode, 0) + guard.ops

    monkeypatch.setattr(runner, "_step", step)
    return seen


def old_step(runner):
    """The step as it was: Python values for the noise / sample of passes that need none
    (a host-to-device copy inside the captured step on CUDA)."""
    def step(buf, mode):
        engine = runner.engine
        B, T, _ = buf.tokens.shape
        logits = engine.model(buf.semantic, buf.tokens, buf.lengths, level=buf.level)
        index = (buf.level - 1).view(B, 1, 1).expand(B, T, 1)
        column = buf.tokens.gather(2, index).squeeze(2)
        eligible = (column == engine.config.mask_id) & (buf.frame_index[None] < buf.lengths[:, None])
        new = engine.ops.masked_resample(
            logits, column, eligible, None if mode.keep_all else buf.num_keep, buf.seeds,
            buf.level, buf.iteration, buf.temperature, buf.noise if mode.noise else 0.0,
            buf.sample if mode.sample else False)
        buf.tokens.scatter_(2, index, new[..., None])
    return step


@pytest.fixture(scope="module", params=[(0, False, False), (8, False, False), (8, True, True)],
                ids=["paper", "prompt-lookup", "semantic-copy-and-prior"])
def model(tiny_config, request):
    lookup, semantic_copy, prior = request.param
    model = make_model(dataclasses.replace(tiny_config, prompt_lookup=lookup,
                                           semantic_copy=semantic_copy, prompt_prior=prior),
                       seed=5, sharpen=20.0)
    if prior:
        with torch.no_grad():
            model.prior.weight.fill_(0.5)
    return model


def test_every_mode_of_scheduled_decoding_is_capture_safe_on_cpu(model, tiny_config, monkeypatch):
    engine = Engine(copy.deepcopy(model), backend="torch")
    seen = guard_steps(monkeypatch, engine.runner)
    requests = requests_for(tiny_config)
    scheduler = Scheduler(engine, max_batch=3, threaded=False)
    handles = [scheduler.submit(**r) for r in requests]
    scheduler.run_until_idle()
    assert scheduler.stats.fallbacks == 0 and scheduler.stats.failed == 0
    # Alone, a greedy noiseless request runs passes in which no row samples or perturbs.
    engine.generate(requests[4]["semantic"][None], decode=DECODES[4], seed=0)
    assert set(seen) == REACHABLE and all(n > 50 for n in seen.values())
    # The guarded steps decode exactly as the plain reference decoder.
    for r, h in zip(requests, handles):
        prompt = r.get("prompt")
        batch = engine.prepare(r["semantic"][None], prompt=None if prompt is None else prompt[None],
                               decode=r["decode"], seed=r["seed"])
        assert torch.equal(h.result(), reference_decode(engine, batch)[0])
    # The two modes no plan reaches, on a scratch bucket.
    scratch = engine.runner.buffers_for(2, 32)
    checked = check_step_modes(engine.runner, scratch, ALL_MODES)
    assert set(checked) == set(ALL_MODES)


def test_lockstep_generate_is_capture_safe_on_ragged_prompted_batches(model, tiny_config, monkeypatch):
    engine = Engine(copy.deepcopy(model), backend="torch")
    seen = guard_steps(monkeypatch, engine.runner)
    cfg = tiny_config
    semantic = random_semantic(cfg, 3, 20, seed=3)
    prompt = random_codes(cfg, 3, 9, cfg.num_quantizers, seed=4)
    out = engine.generate(semantic, semantic_lengths=[20, 6, 13], prompt=prompt,
                          prompt_lengths=[9, 0, 4], decode=DECODES[0], seed=[1, 2, 3])
    assert set(seen) == {StepMode(True, False, True), StepMode(False, True, False)}
    assert out.shape == (3, cfg.frames_for(20), cfg.num_quantizers)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter run; on CUDA see make gpu-check")
def test_every_mode_is_capture_safe_with_the_triton_kernels(model, tiny_config, monkeypatch):
    engine = Engine(copy.deepcopy(model), device=DEVICE, backend="triton")
    seen = guard_steps(monkeypatch, engine.runner)
    scheduler = Scheduler(engine, max_batch=2, threaded=False)
    requests = requests_for(tiny_config, n=5, seed=1)
    handles = [scheduler.submit(**r) for r in requests]
    scheduler.run_until_idle()
    assert scheduler.stats.fallbacks == 0 and scheduler.stats.failed == 0
    engine.generate(requests[4]["semantic"][None], decode=DECODES[4], seed=0)
    assert set(seen) == REACHABLE
    for r, h in zip(requests, handles):
        T = tiny_config.frames_for(r["semantic"].shape[0])
        out = h.result()
        assert out.shape == (T, tiny_config.num_quantizers)
        assert ((out >= 0) & (out < tiny_config.codebook_size)).all()
    checked = check_step_modes(engine.runner, engine.runner.buffers_for(2, 16), ALL_MODES)
    assert set(checked) == set(ALL_MODES)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter run; on CUDA see make gpu-check")
def test_the_guard_catches_python_values_in_the_step(model):
    engine = Engine(copy.deepcopy(model), device=DEVICE, backend="triton")
    runner = engine.runner
    buf = runner.buffers_for(1, 16)
    runner._step = old_step(runner)
    # A pass where some row samples with noise passed tensors even then: it passes.
    check_step_modes(runner, buf, [StepMode(True, False, True)])
    # A greedy pass (the last iteration of every level) turned 0.0 / False into device
    # tensors in the launcher: a host-to-device copy while the stream captures.
    for mode in (StepMode(False, True, False), StepMode(False, False, True)):
        with pytest.raises(CaptureViolation, match="lift_fresh"):
            check_step_modes(runner, buf, [mode])


def test_the_triton_ops_prepare_their_tables_before_capture():
    from soundstorm.kernels import get_ops
    from soundstorm.kernels.triton import prepare_rotary_tables

    assert get_ops("triton", DEVICE).prepare_capture is prepare_rotary_tables
    assert get_ops("torch").prepare_capture(1500, 64, DEVICE) is None


def test_the_guard_catches_syncs_and_copies():
    x = torch.arange(6.0)
    for bad, match in ((lambda: x.sum().item(), "_local_scalar_dense"),
                       (lambda: bool(x.any()), "is_nonzero|_local_scalar_dense"),
                       (lambda: x.nonzero(), "nonzero"),
                       (lambda: x[x > 2], "nonzero|index"),
                       (lambda: x + torch.tensor(1.0), "lift_fresh")):
        with pytest.raises(CaptureViolation, match=match):
            with CaptureGuard("cpu"):
                bad()
    m, host = torch.zeros(3, device="meta"), torch.ones(3)
    with pytest.raises(CaptureViolation, match="reads a tensor on cpu"):
        with CaptureGuard("meta"):
            m + host                   # a host tensor read by a device step: a copy
    with pytest.raises(CaptureViolation, match="puts its result on cpu"):
        with CaptureGuard("meta"):
            torch.ones(3)              # allocated on the host
    with pytest.raises(CaptureViolation, match="puts its result on cpu"):
        with CaptureGuard("meta"):
            m.to("cpu")
    with CaptureGuard("cpu") as guard:
        (x * 2).cumsum(0).argmax()
    assert guard.ops == 3


META_SCRIPT = r"""
import json, sys, torch
from soundstorm.engine import Engine, ModelConfig, SoundStorm
from soundstorm.engine.capture import check_step_modes
from soundstorm.engine.runner import ALL_MODES, StepRunner
from soundstorm.engine.scheduler import batch_buckets

backend, lookup = sys.argv[1], int(sys.argv[2])
engine = Engine(SoundStorm(ModelConfig.preset("tiny", prompt_lookup=lookup,
                                              semantic_copy=lookup > 0,
                                              prompt_prior=lookup > 0)), backend="torch")
if backend == "triton":
    import soundstorm.kernels.triton as triton_backend
    engine.ops = engine.model.ops = triton_backend.TRITON_OPS
# Every tensor the step touches lives on `meta`: a host tensor it reads is a copy.
engine.model.to("meta")
engine.device = torch.device("meta")
engine.runner = StepRunner(engine, use_cuda_graphs=False)
ops = {}
for B in batch_buckets(4):
    for T in (1, 37, 64):
        checked = check_step_modes(engine.runner, engine.runner.buffers_for(B, T), ALL_MODES)
        ops[f"{B}x{T}"] = min(checked.values())
print(json.dumps(ops))
"""


@pytest.mark.parametrize("backend,lookup", [("torch", 0), ("triton", 0), ("triton", 8)])
def test_the_step_reads_no_host_tensor_on_a_device(backend, lookup):
    """On the meta device (compiled Triton kernels, as on a GPU: a fresh process without
    the interpreter) the step reads nothing from the host, in every mode and bucket."""
    if backend == "triton":
        pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", META_SCRIPT, backend, str(lookup)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ops = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(ops) == 9 and min(ops.values()) > 20
