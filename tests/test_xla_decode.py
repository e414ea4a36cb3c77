"""The XLA decode against the torch reference: the counter-based noise bit for bit, the
masked resampling op, and whole decodes (greedy and sampled) through `XlaEngine.generate`
with the torch decoder's invariants checked at every iteration."""

import dataclasses
import re

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from soundstorm.engine import DecodeConfig, Engine  # noqa: E402
from soundstorm.engine.xla import XlaEngine  # noqa: E402
from soundstorm.kernels import rng as torch_rng  # noqa: E402
from soundstorm.kernels.pallas import rng  # noqa: E402
from soundstorm.kernels.pallas.resample import masked_resample_reference  # noqa: E402
from soundstorm.kernels.pallas.select import select_reference  # noqa: E402
from soundstorm.kernels.resample import masked_resample_reference as torch_resample  # noqa: E402

from conftest import make_model, random_codes, random_semantic  # noqa: E402
from test_decode import check_invariants  # noqa: E402

SEEDS = [0, 1, 2 ** 40 + 7, 2 ** 63 - 1]


def test_hashes_are_bit_identical_to_torch():
    lo, hi = rng.split_seeds(SEEDS)
    for level, iteration, stream in ((1, 1, 1), (12, 16, 2), (3, 4095, 1)):
        want = torch_rng.code_keys(torch_rng.frame_keys(
            torch_rng.step_keys(torch.tensor(SEEDS), level, iteration, stream), 37), 29)
        got = rng.code_keys(rng.frame_keys(rng.step_keys(
            jnp.asarray(lo), jnp.asarray(hi), level, iteration, stream), 37), 29)
        np.testing.assert_array_equal(np.asarray(got).astype(np.int64), want.numpy())


def test_gumbel_noise_is_bit_identical_with_the_table_and_close_without():
    g = torch.Generator().manual_seed(1)
    h = torch.cat([torch.randint(0, 2 ** 32, (100_000,), generator=g),
                   torch.tensor([0, 511, 512, 2 ** 32 - 1, 2 ** 31])])
    hj = jnp.asarray(h.numpy().astype(np.uint32))
    want = torch_rng.to_gumbel(h).numpy()
    np.testing.assert_array_equal(np.asarray(rng.to_gumbel(hj, jnp.asarray(rng.gumbel_table()))),
                                  want)
    np.testing.assert_array_equal(np.asarray(rng.to_uniform(hj)), torch_rng.to_uniform(h).numpy())
    np.testing.assert_allclose(np.asarray(rng.to_gumbel(hj)), want, rtol=1e-5, atol=1e-6)


def _torch_keep(confidence, eligible, k):
    """Torch's ranking (stable sorts) as the reference of the bisection."""
    order = confidence.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, eligible.gather(1, order).to(torch.uint8).argsort(
        dim=1, descending=True, stable=True))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return (rank < k[:, None]) & eligible


@pytest.mark.parametrize("T", [1, 7, 130])
def test_bisection_keeps_the_frames_torchs_sort_keeps(T):
    g = torch.Generator().manual_seed(T)
    B = 6
    # few distinct values, so ties (and -0.0 against 0.0, and -inf) are common
    values = torch.tensor([-float("inf"), -3.5, -1.0, -0.0, 0.0, 2.25, 1e30, -1e-38])
    conf = values[torch.randint(0, len(values), (B, T), generator=g)]
    eligible = torch.rand(B, T, generator=g) < 0.7
    eligible[0] = True
    eligible[1] = False
    k = torch.tensor([T, 0, 1, max(T // 2, 1), T + 5, int(eligible[5].sum())])
    want = _torch_keep(conf, eligible, k)
    got = select_reference(jnp.asarray(conf.numpy()), jnp.asarray(eligible.numpy()),
                           jnp.asarray(k.numpy(), jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), want.numpy())
    assert (np.asarray(got).sum(1) == np.minimum(k.numpy(), eligible.sum(1).numpy())).all()


@pytest.mark.parametrize("sample,noise,keep_all", [(True, 1.0, False), (False, 0.5, False),
                                                   (False, 0.0, False), (True, 0.3, True)])
def test_resample_matches_the_torch_reference(sample, noise, keep_all):
    g = torch.Generator().manual_seed(3)
    B, T, C = 4, 23, 37
    logits = torch.randn(B, T, C, generator=g) * 3
    logits[0, 2] = float("nan")                 # a dead frame
    logits[1, 5, 3] = float("inf")
    logits[2, 7, :5] = -float("inf")
    tokens = torch.where(torch.rand(B, T, generator=g) < 0.6, C, 5)
    eligible = (tokens == C) & (torch.rand(B, T, generator=g) < 0.9)
    num_keep = torch.tensor([3, 0, 30, 1])
    seeds = torch.tensor(SEEDS)
    want = torch_resample(logits, tokens, eligible, None if keep_all else num_keep, seeds,
                          2, 3, 0.7, noise, sample)
    lo, hi = rng.split_seeds(SEEDS)
    got = jax.jit(masked_resample_reference)(
        jnp.asarray(logits.numpy()), jnp.asarray(tokens.numpy(), jnp.int32),
        jnp.asarray(eligible.numpy()), jnp.asarray(num_keep.numpy(), jnp.int32), keep_all,
        jnp.asarray(lo), jnp.asarray(hi), 2, 3, 0.7, noise, sample,
        jnp.asarray(rng.gumbel_table()))
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


@pytest.fixture(scope="module")
def engines(tiny_model):
    return Engine(tiny_model, backend="torch"), XlaEngine(tiny_model)


def _batch(cfg):
    semantic = random_semantic(cfg, 3, 23, seed=5)
    prompt = random_codes(cfg, 3, 6, cfg.num_quantizers, seed=6)
    return dict(semantic=semantic, semantic_lengths=torch.tensor([23, 11, 2]), prompt=prompt,
                prompt_lengths=torch.tensor([6, 2, 0]))


@pytest.mark.parametrize("decode", [DecodeConfig(temperature=0, gumbel_scale=0),
                                    DecodeConfig(temperature=0),
                                    DecodeConfig(),
                                    DecodeConfig(steps_per_level=(5, 3, 2, 1), temperature=2.0)])
def test_decode_equals_torch_engine(engines, tiny_config, decode):
    torch_engine, xla_engine = engines
    kw = _batch(tiny_config)
    want = torch_engine.generate(**kw, decode=decode, seed=[11, 2 ** 50, 3])
    got = xla_engine.generate(**kw, decode=decode, seed=[11, 2 ** 50, 3])
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("semantic_copy,prior", [(False, False), (True, False), (True, True)],
                         ids=["lookup", "semantic-copy", "prompt-prior"])
def test_decode_with_the_prompt_lookup_equals_torch_engine(tiny_config, semantic_copy, prior):
    model = make_model(dataclasses.replace(tiny_config, prompt_lookup=8,
                                           semantic_copy=semantic_copy, prompt_prior=prior),
                       seed=1, sharpen=20.0)
    with torch.no_grad():        # gates half open: the copies shape every level's tokens
        model.lookup.copy_bias.zero_()
        if semantic_copy:
            model.lookup.level1_copy_bias.zero_()
            model.lookup.level1_copy_match.fill_(1.0)
        if prior:                # and the prompt's code frequencies weigh in
            model.prior.weight.fill_(0.7)
    kw = _batch(tiny_config)
    for decode in (DecodeConfig(temperature=0, gumbel_scale=0), DecodeConfig()):
        want = Engine(model, backend="torch").generate(**kw, decode=decode, seed=[1, 2, 3])
        got = XlaEngine(model).generate(**kw, decode=decode, seed=[1, 2, 3])
        assert torch.equal(got, want)


def test_a_rows_tokens_do_not_depend_on_its_companions(engines, tiny_config):
    _, xla_engine = engines
    kw = _batch(tiny_config)
    both = xla_engine.generate(**kw, seed=[4, 5, 6])
    alone = xla_engine.generate(kw["semantic"][1:2, :11], prompt=kw["prompt"][1:2, :2], seed=5)
    assert torch.equal(both[1:2, :alone.shape[1]], alone)


@pytest.mark.parametrize("steps", [None, (4, 2, 1, 3)])
def test_invariants_hold_at_every_iteration(engines, tiny_config, steps):
    _, xla_engine = engines
    kw = _batch(tiny_config)
    check_invariants(xla_engine, kw["semantic"], kw["semantic_lengths"], kw["prompt"],
                     kw["prompt_lengths"], DecodeConfig(steps_per_level=steps), seed=9)


def test_bad_input_raises_as_the_torch_engine_does(engines, tiny_config):
    torch_engine, xla_engine = engines
    semantic = random_semantic(tiny_config, 2, 10)
    cases = [dict(semantic=semantic.float()),
             dict(semantic=semantic, prompt=random_codes(tiny_config, 2, 3, 3)),
             dict(semantic=semantic, semantic_lengths=torch.tensor([10, 0])),
             dict(semantic=semantic, decode=DecodeConfig(steps_per_level=(1, 1))),
             dict(semantic=semantic + tiny_config.semantic_vocab_size),
             dict(semantic=semantic, seed=-1)]
    for kw in cases:
        with pytest.raises((TypeError, ValueError)) as want:
            torch_engine.generate(**kw)
        with pytest.raises(type(want.value), match=re.escape(str(want.value))):
            xla_engine.generate(**kw)


def test_engine_arguments_are_checked(tiny_model):
    with pytest.raises(ValueError, match="kernels must be one of"):
        XlaEngine(tiny_model, kernels="cuda")
    with pytest.raises(ValueError, match="exact_noise=True needs kernels='jnp'"):
        XlaEngine(tiny_model, kernels="pallas", exact_noise=True)
    assert XlaEngine(tiny_model, kernels="pallas").table is None
    with pytest.raises(ValueError, match="devices = 99 is out of range"):
        XlaEngine(tiny_model, devices=99)
    with pytest.raises(TypeError, match="model_or_dir must be"):
        XlaEngine(42)


def test_computed_noise_keeps_the_invariants_and_mostly_the_tokens(tiny_model, tiny_config):
    engine = XlaEngine(tiny_model, exact_noise=False)
    assert engine.table is None
    kw = _batch(tiny_config)
    out, _ = check_invariants(engine, kw["semantic"], kw["semantic_lengths"], kw["prompt"],
                              kw["prompt_lengths"], DecodeConfig(), seed=9)
    exact = XlaEngine(tiny_model).generate(**kw, decode=DecodeConfig(), seed=9)
    real = exact >= 0
    # the noise differs in its last bits only: a draw changes where two candidates tie
    # within an ulp, so nearly every token is the same
    assert (out == exact)[real].double().mean() > 0.9


def test_bfloat16_decode_keeps_the_invariants(tiny_model, tiny_config):
    engine = XlaEngine(tiny_model, dtype="bfloat16")
    assert engine.dtype == torch.bfloat16
    kw = _batch(tiny_config)
    check_invariants(engine, kw["semantic"], kw["semantic_lengths"], kw["prompt"],
                     kw["prompt_lengths"], DecodeConfig(steps_per_level=(4, 2, 1, 1)), seed=2)
