"""The weights of a SoundStorm checkpoint as JAX arrays.

The same `config.json` + `model.safetensors` the torch engine loads, read through the same
checks (`soundstorm.engine.model.read_weights`: names, shapes, dtypes, checksums, finite
values, room in memory), then converted tensor by tensor. The Conformer blocks' weights are
stacked along a leading `depth` axis so the forward pass scans over layers (one compiled
block, whatever the depth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np

from soundstorm.engine.config import ModelConfig
# Level 1's copy, present when `config.semantic_copy` is set; the prompt prior, when
# `config.prompt_prior` is.
from soundstorm.engine.model import PROMPT_PRIOR_KEYS, SEMANTIC_COPY_KEYS

# Per-block state_dict keys (after "blocks.{i}.") -> name in the stacked pytree.
BLOCK_KEYS = (
    "ff1.norm.weight", "ff1.norm.bias", "ff1.up.weight", "ff1.up.bias", "ff1.down.weight",
    "ff1.down.bias",
    "attn.norm.weight", "attn.norm.bias", "attn.qkv.weight", "attn.qkv.bias",
    "attn.out.weight", "attn.out.bias",
    "conv.norm.weight", "conv.norm.bias", "conv.pointwise_in.weight", "conv.pointwise_in.bias",
    "conv.depthwise.weight", "conv.depthwise.bias", "conv.inner_norm.weight",
    "conv.inner_norm.bias", "conv.pointwise_out.weight", "conv.pointwise_out.bias",
    "ff2.norm.weight", "ff2.norm.bias", "ff2.up.weight", "ff2.up.bias", "ff2.down.weight",
    "ff2.down.bias",
    "norm.weight", "norm.bias",
)
TOP_KEYS = ("semantic_embed.weight", "acoustic_embed.weight", "norm.weight", "norm.bias",
            "head_weight", "head_bias")

# The prompt lookup's keys, present when `config.prompt_lookup` is not 0.
LOOKUP_KEYS = ("lookup.key_embed.weight", "lookup.context", "lookup.log_scale",
               "lookup.gain", "lookup.value_embed.weight", "lookup.copy_weight",
               "lookup.copy_bias")

Params = Dict[str, Any]
# Parameter (and activation) dtypes of the XLA path.
DTYPES = ("float32", "bfloat16")


def params_from_state(state: Mapping[str, Any], config: ModelConfig,
                      dtype: str = "float32") -> Params:
    """A torch state_dict (tensors or numpy arrays) -> the JAX parameter pytree in `dtype`
    (float32 or bfloat16): {top-level key: array, "blocks": {block key: array [depth,
    ...]}}. Linear weights keep torch's [out, in] layout; the depthwise kernel [E, 1, K]
    becomes [K, E]."""
    import jax.numpy as jnp

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    target = getattr(jnp, dtype)

    def host(value) -> np.ndarray:
        if hasattr(value, "detach"):
            value = value.detach().cpu().float().numpy()
        return np.asarray(value, dtype=np.float32)

    top = (TOP_KEYS + (LOOKUP_KEYS if config.prompt_lookup else ())
           + (SEMANTIC_COPY_KEYS if config.semantic_copy else ())
           + (PROMPT_PRIOR_KEYS if config.prompt_prior else ()))
    missing = [k for k in top if k not in state]
    missing += [f"blocks.{i}.{k}" for i in range(config.depth) for k in BLOCK_KEYS
                if f"blocks.{i}.{k}" not in state]
    if missing:
        raise ValueError(f"state is missing {len(missing)} tensor(s) of a {config.depth}-layer "
                         f"model, first {missing[0]!r}")
    params: Params = {k: jnp.asarray(host(state[k]), target) for k in top}
    blocks = {}
    for key in BLOCK_KEYS:
        stacked = np.stack([host(state[f"blocks.{i}.{key}"]) for i in range(config.depth)])
        if key == "conv.depthwise.weight":                        # [L, E, 1, K] -> [L, K, E]
            stacked = np.ascontiguousarray(stacked[:, :, 0, :].transpose(0, 2, 1))
        blocks[key] = jnp.asarray(stacked, target)
    params["blocks"] = blocks
    return params


def load_params(directory: Union[str, Path],
                dtype: str = "float32") -> Tuple[ModelConfig, Params]:
    """(config, params in `dtype`) of a model directory written by
    `SoundStorm.save_pretrained`.
    Raises what `SoundStorm.from_pretrained` raises for a bad directory (FileNotFoundError,
    ValueError naming the file and the tensor); nothing is unpickled."""
    import torch

    from soundstorm.engine.model import load_config, read_weights

    config = load_config(directory)
    state = read_weights(directory, config, device="cpu", dtype=torch.float32)
    return config, params_from_state(state, config, dtype)
