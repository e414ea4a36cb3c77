"""The Pallas kernels against their `jnp` references (and those against torch), run in
interpret mode on this CPU, and the TPU lowering of each kernel and of the whole decode
(`jax.export(..., platforms=["tpu"])`)."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from soundstorm.engine import DecodeConfig  # noqa: E402
from soundstorm.engine.xla import XlaEngine  # noqa: E402
from soundstorm.engine.xla.decode import decode_all  # noqa: E402
from soundstorm.kernels.pallas.attention import (attention_reference,  # noqa: E402
                                                 flash_attention)
from soundstorm.kernels.pallas.embedding import (summed_embedding,  # noqa: E402
                                                 summed_embedding_reference)
from soundstorm.kernels.pallas import rng  # noqa: E402
from soundstorm.kernels.pallas.resample import (candidates, masked_resample,  # noqa: E402
                                                masked_resample_reference)
from soundstorm.kernels.pallas.select import select, select_reference  # noqa: E402

from conftest import make_model, random_semantic  # noqa: E402

INTERPRET = True


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), tree)


def _lowers_for_tpu(fn, *args):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*_spec(args))
    return exported.platforms == ("tpu",) and "tpu_custom_call" in exported.mlir_module()


def _confidences(B, T, seed):
    rng = np.random.default_rng(seed)
    values = np.array([-np.inf, -7.25, -1.0, -0.0, 0.0, 0.5, 3e38], np.float32)
    conf = np.where(rng.random((B, T)) < 0.5, values[rng.integers(0, len(values), (B, T))],
                    rng.standard_normal((B, T)).astype(np.float32))
    eligible = rng.random((B, T)) < 0.75
    return conf, eligible


@pytest.mark.parametrize("B,T", [(1, 1), (3, 127), (9, 130), (2, 301)])
def test_select_kernel_equals_its_reference(B, T):
    conf, eligible = _confidences(B, T, seed=B * T)
    rng = np.random.default_rng(T)
    k = rng.integers(0, T + 3, B).astype(np.int32)
    k[0] = min(T, 1)
    args = (jnp.asarray(conf), jnp.asarray(eligible), jnp.asarray(k))
    want = np.asarray(select_reference(*args))
    got = np.asarray(select(*args, interpret=INTERPRET))
    np.testing.assert_array_equal(got, want)
    assert (got.sum(1) == np.minimum(k, eligible.sum(1))).all()


@pytest.mark.parametrize("B,T,Q,C,D,num,den", [(1, 1, 1, 3, 128, 1, 2), (2, 13, 3, 7, 128, 1, 2),
                                               (3, 10, 4, 5, 256, 3, 5)])
def test_embedding_kernel_equals_its_reference_and_torch(B, T, Q, C, D, num, den):
    from soundstorm.kernels.embedding import summed_embedding_reference as torch_embedding

    rng = np.random.default_rng(T)
    S = ((T - 1) * num) // den + 1
    V = 11
    semantic = rng.integers(0, V, (B, S)).astype(np.int32)
    tokens = rng.integers(0, C + 1, (B, T, Q)).astype(np.int32)
    st = rng.standard_normal((V, D)).astype(np.float32)
    at = rng.standard_normal((Q * C + 1, D)).astype(np.float32)
    args = (jnp.asarray(semantic), jnp.asarray(tokens), jnp.asarray(st), jnp.asarray(at))
    want = np.asarray(summed_embedding_reference(*args, num, den))
    got = np.asarray(summed_embedding(*args, num, den, interpret=INTERPRET))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    ref = torch_embedding(torch.from_numpy(semantic).long(), torch.from_numpy(tokens).long(),
                          torch.from_numpy(st), torch.from_numpy(at), num, den)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,H,T,dh,lengths", [(1, 1, 1, 8, [1]), (2, 3, 130, 10, [130, 7]),
                                               (3, 2, 300, 64, [300, 129, 128])])
def test_attention_kernel_equals_its_reference_and_torch(B, H, T, dh, lengths):
    rng = np.random.default_rng(T)
    q, k, v = (rng.standard_normal((B, H, T, dh)).astype(np.float32) * 2 for _ in range(3))
    lengths = np.array(lengths, np.int32)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths))
    want = np.asarray(attention_reference(*args))
    got = np.asarray(flash_attention(*args, interpret=INTERPRET))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # the reference against torch's SDPA on the same (already rotated) q and k
    key_mask = torch.arange(T)[None, :] < torch.from_numpy(lengths)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
        attn_mask=key_mask[:, None, None, :])
    np.testing.assert_allclose(want, ref.numpy(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("sample,noise,keep_all", [(True, 1.0, False), (False, 0.5, False),
                                                   (False, 0.0, False), (True, 0.3, True)])
@pytest.mark.parametrize("B,T,C", [(4, 23, 37), (1, 1, 1), (2, 130, 129)])
def test_resample_kernels_equal_the_reference_with_computed_noise(B, T, C, sample, noise,
                                                                  keep_all):
    g = torch.Generator().manual_seed(T + C)
    logits = torch.randn(B, T, C, generator=g) * 3
    if T > 7 and C > 5:
        logits[0, 2] = float("nan")                 # a dead frame
        logits[-1, 5, 3] = float("inf")
        logits[0, 7, :5] = -float("inf")
    tokens = torch.where(torch.rand(B, T, generator=g) < 0.6, C, 0)
    eligible = (tokens == C) & (torch.rand(B, T, generator=g) < 0.9)
    num_keep = torch.randint(0, T + 2, (B,), generator=g)
    lo, hi = rng.split_seeds([0, 1, 2 ** 40 + 7, 2 ** 63 - 1][:B])
    args = (jnp.asarray(logits.numpy()), jnp.asarray(tokens.numpy(), jnp.int32),
            jnp.asarray(eligible.numpy()), jnp.asarray(num_keep.numpy(), jnp.int32), keep_all,
            jnp.asarray(lo), jnp.asarray(hi), 2, 3, 0.7, noise, sample)
    want = np.asarray(masked_resample_reference(*args, None))
    got = np.asarray(masked_resample(*args, interpret=INTERPRET))
    np.testing.assert_array_equal(got, want)


def test_kernels_lower_for_tpu():
    conf, eligible = _confidences(5, 200, seed=0)
    assert _lowers_for_tpu(select, jnp.asarray(conf), jnp.asarray(eligible),
                           jnp.zeros(5, jnp.int32))
    emb = functools.partial(summed_embedding, rate_num=1, rate_den=2)
    assert _lowers_for_tpu(emb, jnp.zeros((2, 7), jnp.int32), jnp.zeros((2, 13, 3), jnp.int32),
                           jnp.zeros((5, 128)), jnp.zeros((22, 128)))
    seeds = jnp.zeros(2, jnp.uint32)
    assert _lowers_for_tpu(lambda x, lo, hi: candidates(x, lo, hi, 2, 3, 0.7, 0.5, True),
                           jnp.zeros((2, 300, 1024)), seeds, seeds)
    qkv = jnp.zeros((2, 4, 300, 64))
    assert _lowers_for_tpu(flash_attention, qkv, qkv, qkv, jnp.array([300, 5], jnp.int32))


def test_decode_with_the_kernels_equals_the_jnp_decode(tiny_model, tiny_config):
    semantic = random_semantic(tiny_config, 2, 9, seed=2)
    decode = DecodeConfig(steps_per_level=(2, 1, 1, 1))
    want = XlaEngine(tiny_model, exact_noise=False).generate(semantic, seed=[5, 6],
                                                            decode=decode)
    got = XlaEngine(tiny_model, kernels="pallas").generate(semantic, seed=[5, 6], decode=decode)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kernels,lookup", [("jnp", 0), ("pallas", 0), ("pallas", 8)])
def test_whole_decode_lowers_for_tpu(tiny_model, tiny_config, kernels, lookup):
    model = tiny_model
    if lookup:
        model = make_model(dataclasses.replace(tiny_config, prompt_lookup=lookup))
    engine = XlaEngine(model, kernels=kernels)
    _, arrays, schedule = engine.inputs(random_semantic(tiny_config, 2, 9), seed=1)
    embedding = resample = attention = None
    if kernels == "pallas":                                # compiled, not interpreted
        embedding, resample, attention = summed_embedding, masked_resample, flash_attention
    cfg = model.config

    def program(params, semantic, tokens, lengths, lo, hi, sched, table):
        return decode_all(params, cfg, semantic, tokens, lengths, lo, hi, sched, table,
                          embedding, resample, attention)

    exported = jax.export.export(jax.jit(program), platforms=["tpu"])(
        *_spec((engine.params, *arrays, schedule, engine.table)))
    assert exported.platforms == ("tpu",)
    text = exported.mlir_module()
    assert "while" in text                                 # one loop over the schedule
    assert ("tpu_custom_call" in text) == (kernels == "pallas")
