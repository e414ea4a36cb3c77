"""The XLA path's weights and forward pass: the same checkpoint as the torch model, the
same logits (float32 tolerance)."""

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from soundstorm.engine import ModelConfig  # noqa: E402
from soundstorm.engine.xla import model as xla_model  # noqa: E402
from soundstorm.engine.xla.params import load_params, params_from_state  # noqa: E402
from soundstorm.kernels import embedding as torch_embedding  # noqa: E402
from soundstorm.kernels.pallas.embedding import summed_embedding_reference  # noqa: E402

from conftest import make_model  # noqa: E402


def _inputs(cfg, B, T, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randint(0, cfg.semantic_vocab_size, (B, S), generator=g)
    tokens = torch.randint(0, cfg.codebook_size + 1, (B, T, cfg.num_quantizers), generator=g)
    return semantic, tokens


def _j(x):
    return jnp.asarray(x.numpy(), jnp.int32)


@pytest.fixture(scope="module")
def model():
    # Odd sizes: 3 heads of 10 channels, conv kernel 3, a rate ratio of 3/5.
    cfg = ModelConfig.preset("tiny", dim=30, heads=3, ff_dim=52, conv_kernel=3,
                             semantic_rate=30, frame_rate=50, depth=3)
    m = make_model(cfg, seed=1)
    with torch.no_grad():      # weights far from the small init, so every term matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("level", [1, 3, None])
def test_logits_match_torch_with_padding(model, level):
    cfg = model.config
    semantic, tokens = _inputs(cfg, 3, 41, 25)
    lengths = torch.tensor([41, 17, 1])
    with torch.no_grad():
        ref = model(semantic, tokens, lengths, level=level).numpy()
    params = params_from_state(model.state_dict(), cfg)
    out = np.asarray(xla_model.forward(params, cfg, _j(semantic), _j(tokens), _j(lengths), level))
    assert out.shape == ref.shape
    valid = np.arange(41)[None, :] < lengths.numpy()[:, None]
    np.testing.assert_allclose(out[valid], ref[valid], rtol=1e-5, atol=2e-5)


def _check_against_torch(m, semantic, tokens, lengths, level):
    """The XLA forward of `m`'s weights equals `m`'s on the real frames."""
    with torch.no_grad():
        ref = m(semantic, tokens, lengths, level=level).numpy()
    params = params_from_state(m.state_dict(), m.config)
    out = np.asarray(xla_model.forward(params, m.config, _j(semantic), _j(tokens),
                                       _j(lengths), level))
    valid = np.arange(tokens.shape[1])[None, :] < lengths.numpy()[:, None]
    np.testing.assert_allclose(out[valid], ref[valid], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("semantic_copy,prior", [(False, False), (True, False), (True, True)],
                         ids=["lookup", "semantic-copy", "prompt-prior"])
@pytest.mark.parametrize("level", [1, 2, 3, None])
def test_logits_with_the_prompt_lookup_match_torch(level, semantic_copy, prior):
    cfg = ModelConfig.preset("tiny", dim=30, heads=3, ff_dim=52, conv_kernel=3, depth=2,
                             prompt_lookup=6, semantic_copy=semantic_copy, prompt_prior=prior)
    m = make_model(cfg, seed=2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    semantic, tokens = _inputs(cfg, 3, 23, 12, seed=4)
    semantic[:, 6:] = semantic[:, :6].clone()         # ids the prompt also reads
    tokens[0, 9:, 1:] = cfg.mask_id           # prompt, then the finer levels masked
    tokens[2, :, 3] = cfg.mask_id             # no reference frame: the lookup reads nothing
    _check_against_torch(m, semantic, tokens, torch.tensor([23, 14, 23]), level)
    with pytest.raises(ValueError, match=f"missing {12 if semantic_copy else 7} tensor.*"
                                         "'lookup.key_embed.weight'"):
        params_from_state({k: v for k, v in m.state_dict().items()
                           if not k.startswith("lookup.")}, cfg)


@pytest.mark.parametrize("level", [1, 4, None])
def test_logits_with_the_prompt_prior_alone_match_torch(level):
    cfg = ModelConfig.preset("tiny", dim=30, heads=3, ff_dim=52, conv_kernel=3, depth=2,
                             prompt_prior=True)
    m = make_model(cfg, seed=3)
    with torch.no_grad():
        m.prior.weight.copy_(torch.tensor([0.9, 0.4, 1.3, 0.2]))
        m.prior.log_smoothing.copy_(torch.tensor([-1.0, 0.5, 0.0, 2.0]))
    semantic, tokens = _inputs(cfg, 3, 23, 12, seed=5)
    tokens = tokens % 6                       # few codes: the prompt's counts matter
    tokens[0, 9:, 1:] = cfg.mask_id           # prompt of 9 frames, the rest to decode
    tokens[1, 5:, :] = cfg.mask_id
    tokens[2, :, 3] = cfg.mask_id             # no reference: the uniform prior
    _check_against_torch(m, semantic, tokens, torch.tensor([23, 14, 23]), level)
    with pytest.raises(ValueError, match="missing 2 tensor.*'prior.weight'"):
        params_from_state({k: v for k, v in m.state_dict().items()
                           if not k.startswith("prior.")}, cfg)


def test_embedding_reference_matches_torch(model):
    cfg = model.config
    semantic, tokens = _inputs(cfg, 2, 13, 8, seed=3)
    num, den = cfg.semantic_index_fraction()
    sd = model.state_dict()
    ref = torch_embedding.summed_embedding_reference(
        semantic, tokens, sd["semantic_embed.weight"], sd["acoustic_embed.weight"], num, den)
    out = summed_embedding_reference(_j(semantic), _j(tokens),
                                     jnp.asarray(sd["semantic_embed.weight"].numpy()),
                                     jnp.asarray(sd["acoustic_embed.weight"].numpy()), num, den)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_load_params_reads_a_saved_model_with_the_torch_checks(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    cfg, params = load_params(tmp_path / "m")
    assert cfg == model.config
    assert params["blocks"]["attn.qkv.weight"].shape == (cfg.depth, 3 * cfg.dim, cfg.dim)
    assert params["blocks"]["conv.depthwise.weight"].shape == (cfg.depth, cfg.conv_kernel,
                                                               cfg.conv_dim)
    np.testing.assert_array_equal(np.asarray(params["head_weight"]),
                                  model.head_weight.detach().numpy())
    # A corrupt file fails as it fails for torch: the checksum names the tensor.
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["norm.bias"] = state["norm.bias"] + 1
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match="norm.bias.*sha256"):
        load_params(tmp_path / "m")


def test_missing_directory_and_tensors_are_named(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_params(tmp_path / "nowhere")
    state = dict(model.state_dict())
    del state["blocks.2.conv.depthwise.bias"]
    with pytest.raises(ValueError, match="blocks.2.conv.depthwise.bias"):
        params_from_state(state, model.config)


def test_bfloat16_logits_are_as_close_to_float32_as_torchs_bfloat16(model):
    """In bfloat16 the XLA forward may be at most twice as far from the float32 logits as
    the torch model in bfloat16 is (plus a bfloat16 ulp of the logits' scale)."""
    import copy

    cfg = model.config
    semantic, tokens = _inputs(cfg, 2, 33, 20, seed=4)
    lengths = torch.tensor([33, 12])
    with torch.no_grad():
        exact = model(semantic, tokens, lengths, level=2).numpy()
        torch_bf16 = copy.deepcopy(model).to(torch.bfloat16)(
            semantic, tokens, lengths, level=2).float().numpy()
    params = params_from_state(model.state_dict(), cfg, "bfloat16")
    assert params["blocks"]["ff1.up.weight"].dtype == jnp.bfloat16
    out = xla_model.forward(params, cfg, _j(semantic), _j(tokens), _j(lengths), 2)
    assert out.dtype == jnp.bfloat16
    valid = np.arange(33)[None, :] < lengths.numpy()[:, None]
    ours = np.abs(np.asarray(out, np.float32) - exact)[valid].max()
    theirs = np.abs(torch_bf16 - exact)[valid].max()
    assert ours <= 2 * theirs + 2 ** -8 * np.abs(exact).max()


def test_unknown_dtype_is_refused(model):
    with pytest.raises(ValueError, match="dtype must be one of"):
        params_from_state(model.state_dict(), model.config, "float16")
