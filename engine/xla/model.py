"""The SoundStorm forward pass in `jax.numpy`, on the parameter pytree of
`soundstorm.engine.xla.params`: the same computation as `soundstorm.engine.model.SoundStorm`
(summed embeddings, Conformer blocks with rotary attention over real keys only and a
convolution module that zeroes padding, the head of one level)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from soundstorm.engine.config import ModelConfig
from soundstorm.kernels.pallas.attention import attention_reference
from soundstorm.kernels.pallas.embedding import summed_embedding_reference

ROTARY_BASE = 10000.0
EPS = 1e-5


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + EPS) * weight.astype(jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """x [..., in] @ weight [out, in]^T + bias [out] (torch's layout): accumulated in
    float32, rounded once to x's dtype."""
    y = jnp.einsum("...i,oi->...o", x, weight, preferred_element_type=jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def rotary_tables(num_frames: int, head_dim: int):
    """cos, sin float32 [T, head_dim // 2], as `soundstorm.kernels.attention.rotary_tables`."""
    inv_freq = ROTARY_BASE ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(num_frames, dtype=jnp.float32)[:, None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, H, T, dh]: channel pairs (i, i + dh/2) rotated by the frame's angle, in
    float32 and rounded once to x's dtype (as `soundstorm.kernels.attention.rotate`)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    y = jnp.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)
    return y.astype(x.dtype)


def conv_inner(h, dw_weight, dw_bias, norm_weight, norm_bias, frame_mask):
    """GLU, padding zeroed, depthwise conv (dw_weight [K, E]), LayerNorm, swish:
    [B, T, 2E] -> [B, T, E]."""
    a, gate = jnp.split(h, 2, axis=-1)
    x = a * jax.nn.sigmoid(gate) * frame_mask[..., None].astype(h.dtype)
    K, T = dw_weight.shape[0], x.shape[1]
    padded = jnp.pad(x, ((0, 0), (K // 2, K // 2), (0, 0)))
    y = dw_bias + sum(padded[:, k:k + T] * dw_weight[k] for k in range(K))
    return jax.nn.silu(layer_norm(y, norm_weight, norm_bias))


def block(x, p, lengths, frame_mask, cos, sin, heads: int, attention=attention_reference):
    """One Conformer block: x + FFN/2, + MHSA, + Conv, + FFN/2, LayerNorm. x [B, T, D]."""
    B, T, D = x.shape

    def ffn(h, name):
        return linear(jax.nn.silu(linear(h, p[name + ".up.weight"], p[name + ".up.bias"])),
                      p[name + ".down.weight"], p[name + ".down.bias"])

    x = x + 0.5 * ffn(layer_norm(x, p["ff1.norm.weight"], p["ff1.norm.bias"]), "ff1")
    h = layer_norm(x, p["attn.norm.weight"], p["attn.norm.bias"])
    qkv = linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(B, T, 3, heads, -1)
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
    y = attention(rotate(q, cos, sin), rotate(k, cos, sin), v, lengths)
    x = x + linear(jnp.transpose(y, (0, 2, 1, 3)).reshape(B, T, D), p["attn.out.weight"],
                   p["attn.out.bias"])
    h = layer_norm(x, p["conv.norm.weight"], p["conv.norm.bias"])
    h = linear(h, p["conv.pointwise_in.weight"], p["conv.pointwise_in.bias"])
    h = conv_inner(h, p["conv.depthwise.weight"], p["conv.depthwise.bias"],
                   p["conv.inner_norm.weight"], p["conv.inner_norm.bias"], frame_mask)
    x = x + linear(h, p["conv.pointwise_out.weight"], p["conv.pointwise_out.bias"])
    x = x + 0.5 * ffn(layer_norm(x, p["ff2.norm.weight"], p["ff2.norm.bias"]), "ff2")
    return layer_norm(x, p["norm.weight"], p["norm.bias"])


Op = Callable[..., jax.Array]


def lookup_weights(params, config: ModelConfig, tokens: jax.Array,
                   frame_mask: jax.Array) -> jax.Array:
    """`soundstorm.engine.model.PromptLookup.weights`: how much every frame with a level-1
    code reads of each reference frame (real, all codes known) that shares its level-1
    context, float32 [B, T, T]; rows sum to 1, or are 0 where a frame reads nothing."""
    B, T, Q = tokens.shape
    C = config.codebook_size
    codes = jnp.clip(tokens, 0, C)
    e = params["lookup.key_embed.weight"].astype(jnp.float32)[codes[..., 0]]
    e = e * frame_mask[..., None]
    w = params["lookup.context"].astype(jnp.float32)
    k = (w[1] * e + w[0] * jnp.pad(e[:, :-1], ((0, 0), (1, 0), (0, 0)))
         + w[2] * jnp.pad(e[:, 1:], ((0, 0), (0, 1), (0, 0))))
    k = k * jax.lax.rsqrt(jnp.sum(jnp.square(k), axis=2, keepdims=True) + 1e-12)
    scale = jnp.exp(params["lookup.log_scale"].astype(jnp.float32))
    scores = jnp.einsum("bik,bjk->bij", k, k) * scale
    reference = frame_mask & jnp.all(codes != C, axis=2)
    reads = frame_mask & (codes[..., 0] != C)
    allowed = reads[:, :, None] & reference[:, None, :] & ~jnp.eye(T, dtype=bool)
    weights = jax.nn.softmax(jnp.where(allowed, scores, -1e9), axis=2)
    return jnp.where(allowed, weights, 0.0)


def prompt_lookup(params, config: ModelConfig, tokens: jax.Array,
                  weights: jax.Array) -> jax.Array:
    """`soundstorm.engine.model.PromptLookup.read`: what every frame reads into its input
    through the lookup's `weights`, float32 [B, T, D]."""
    Q, C = tokens.shape[2], config.codebook_size
    weights = weights * params["lookup.gain"].astype(jnp.float32)
    finer = jnp.clip(tokens[..., 1:], 0, C - 1) + jnp.arange(Q - 1) * C
    values = params["lookup.value_embed.weight"].astype(jnp.float32)[finer].sum(axis=2)
    return jnp.einsum("bij,bjd->bid", weights, values)


def semantic_weights(params, config: ModelConfig, semantic: jax.Array, tokens: jax.Array,
                     frame_mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """`soundstorm.engine.model.PromptLookup.semantic_weights`: how much every real frame's
    level-1 vote takes from each reference frame (real, all codes known, not itself), by
    the match of the semantic ids the frames and their neighbours read, float32 [B, T, T]
    (rows sum to 1, or are 0 where a frame has no reference); and each frame's best match
    [B, T] (0 without a reference)."""
    B, T, Q = tokens.shape
    C = config.codebook_size
    num, den = config.semantic_index_fraction()
    index = jnp.minimum(jnp.arange(T) * num // den, semantic.shape[1] - 1)
    ids = semantic[:, index]                                                    # [B, T]
    same = ((ids[:, :, None] == ids[:, None, :]) & frame_mask[:, :, None]
            & frame_mask[:, None, :]).astype(jnp.float32)
    u = params["lookup.semantic_context"].astype(jnp.float32)
    match = (u[1] * same + u[0] * jnp.pad(same[:, :-1, :-1], ((0, 0), (1, 0), (1, 0)))
             + u[2] * jnp.pad(same[:, 1:, 1:], ((0, 0), (0, 1), (0, 1))))
    scores = match * jnp.exp(params["lookup.semantic_log_scale"].astype(jnp.float32))
    reference = frame_mask & jnp.all(jnp.clip(tokens, 0, C) != C, axis=2)
    allowed = frame_mask[:, :, None] & reference[:, None, :] & ~jnp.eye(T, dtype=bool)
    weights = jax.nn.softmax(jnp.where(allowed, scores, -1e9), axis=2)
    best = jnp.max(jnp.where(allowed, match, 0.0), axis=2)
    return jnp.where(allowed, weights, 0.0), best


def lookup_copy(params, config: ModelConfig, logits: jax.Array, h: jax.Array,
                tokens: jax.Array, weights: jax.Array, level,
                level1: Optional[Tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """`soundstorm.engine.model.PromptLookup.copy`: the head's `logits` of `level` (a Python
    int, a traced int32 scalar, or None for every head) mixed with the lookup's vote at the
    finer levels, and at level 1 with the vote of `level1` (`semantic_weights`' weights and
    best matches; None leaves level 1 alone), float32 of the logits' shape."""
    B, T, Q = tokens.shape
    C = config.codebook_size
    codes = jnp.arange(C)
    reads = jnp.sum(weights, axis=2) > 0                                        # [B, T]
    a = params["lookup.copy_weight"].astype(jnp.float32)
    b = params["lookup.copy_bias"].astype(jnp.float32)
    if level1 is not None:
        level1_weights, best = level1
        gate1 = (h @ params["lookup.level1_copy_weight"].astype(jnp.float32)
                 + params["lookup.level1_copy_match"].astype(jnp.float32) * best
                 + params["lookup.level1_copy_bias"].astype(jnp.float32))
        reads1 = jnp.sum(level1_weights, axis=2) > 0
    if level is None:
        onehot = (tokens[..., 1:, None] == codes).astype(jnp.float32).reshape(B, T, -1)
        vote = jnp.einsum("bij,bjc->bic", weights, onehot).reshape(B, T, Q - 1, C)
        gate = jnp.einsum("btd,qd->btq", h, a) + b
        finer = _mix(logits[:, :, 1:], vote, gate, reads[..., None])
        first = logits[:, :, :1]
        if level1 is not None:
            vote1 = jnp.einsum("bij,bjc->bic", level1_weights,
                               (tokens[..., 0, None] == codes).astype(jnp.float32))
            first = _mix(logits[:, :, 0], vote1, gate1, reads1)[:, :, None]
        return jnp.concatenate([first, finer], axis=2)
    column = jax.lax.dynamic_index_in_dim(tokens, level - 1, axis=2, keepdims=False)
    row = jnp.maximum(level - 2, 0)
    gate = (jnp.einsum("btd,d->bt", h, jax.lax.dynamic_index_in_dim(a, row, 0, False))
            + jax.lax.dynamic_index_in_dim(b, row, 0, False))
    reads = reads & (level >= 2)
    if level1 is not None:
        first = level == 1
        weights = jnp.where(first, level1_weights, weights)
        gate = jnp.where(first, gate1, gate)
        reads = jnp.where(first, reads1, reads)
    vote = jnp.einsum("bij,bjc->bic", weights, (column[..., None] == codes).astype(jnp.float32))
    return _mix(logits, vote, gate, reads)


def _mix(logits, vote, gate, reads):
    g = (jax.nn.sigmoid(gate) * reads)[..., None]
    p = jax.nn.softmax(logits, axis=-1)
    mixed = jnp.log(jnp.maximum(p + g * (vote - p), jnp.finfo(jnp.float32).tiny))
    return jnp.where(reads[..., None], mixed, logits)


def prompt_prior(params, config: ModelConfig, logits: jax.Array, tokens: jax.Array,
                 frame_mask: jax.Array, level) -> jax.Array:
    """`soundstorm.engine.model.PromptPrior`: `logits` of `level` (a Python int, a traced
    int32 scalar, or None for every head) plus beta_q log((n_qc + alpha_q) / (N + alpha_q C)),
    n_qc the reference frames holding code c at level q and N their count, float32."""
    B, T, Q = tokens.shape
    C = config.codebook_size
    codes = jnp.clip(tokens, 0, C)
    reference = (frame_mask & jnp.all(codes != C, axis=2)).astype(jnp.float32)   # [B, T]
    index = (jnp.minimum(codes, C - 1) + jnp.arange(Q) * C).reshape(B, T * Q)
    counts = jnp.zeros((B, Q * C), jnp.float32).at[jnp.arange(B)[:, None], index].add(
        jnp.repeat(reference, Q, axis=1)).reshape(B, Q, C)
    alpha = jnp.exp(params["prior.log_smoothing"].astype(jnp.float32))[:, None]
    total = jnp.sum(reference, axis=1)[:, None, None]
    lp = (jnp.log((counts + alpha) / (total + alpha * C))
          * params["prior.weight"].astype(jnp.float32)[:, None])                # [B, Q, C]
    if level is None:
        return logits + lp[:, None]
    return logits + jax.lax.dynamic_index_in_dim(lp, level - 1, axis=1, keepdims=True)


def hidden(params, config: ModelConfig, semantic: jax.Array, tokens: jax.Array,
           lengths: jax.Array, embedding: Optional[Op] = None,
           attention: Optional[Op] = None) -> jax.Array:
    """Final hidden states float32 [B, T, D] (after the last LayerNorm), and the prompt
    lookup's weights [B, T, T] (`lookup_weights`; None without the lookup).

    semantic int32 [B, S]; tokens int32 [B, T, Q] (MASK = codebook_size); lengths int32 [B]
    real frames per row (1..T). `embedding` and `attention` replace the `jnp` references
    `summed_embedding_reference` and `attention_reference` (same signatures: the Pallas
    kernels)."""
    B, T, _ = tokens.shape
    num, den = config.semantic_index_fraction()
    embed = embedding or summed_embedding_reference
    x = embed(semantic, tokens, params["semantic_embed.weight"],
              params["acoustic_embed.weight"], num, den)
    frame_mask = jnp.arange(T)[None, :] < lengths[:, None]
    weights = None
    if config.prompt_lookup:
        weights = lookup_weights(params, config, tokens, frame_mask)
        x = x + prompt_lookup(params, config, tokens, weights).astype(x.dtype)
    cos, sin = rotary_tables(T, config.head_dim)

    def layer(x, p):
        return block(x, p, lengths, frame_mask, cos, sin, config.heads,
                     attention or attention_reference), None

    x, _ = jax.lax.scan(layer, x, params["blocks"])
    return layer_norm(x, params["norm.weight"], params["norm.bias"]), weights


def head(params, h: jax.Array, level) -> jax.Array:
    """Logits float32 [B, T, C] of `level` (1-based; a Python int or a traced int32
    scalar) from hidden states [B, T, D]: only that level's head is computed."""
    w = jax.lax.dynamic_index_in_dim(params["head_weight"], level - 1, 0, keepdims=False)
    b = jax.lax.dynamic_index_in_dim(params["head_bias"], level - 1, 0, keepdims=False)
    return linear(h, w, b)


def forward(params, config: ModelConfig, semantic, tokens, lengths, level,
            embedding: Optional[Op] = None, attention: Optional[Op] = None) -> jax.Array:
    """Logits float32 [B, T, C] of `level` (see `hidden` and `head`; with the prompt lookup,
    its copy mixed in: `lookup_copy`, at level 1 too with `semantic_copy`; with
    `prompt_prior`, then the prior: `prompt_prior`); level None gives every head,
    [B, T, Q, C]."""
    h, weights = hidden(params, config, semantic, tokens, lengths, embedding, attention)
    if level is None:
        logits = jnp.einsum("btd,qcd->btqc", h, params["head_weight"]) + params["head_bias"]
    else:
        logits = head(params, h, level)
    frame_mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    if weights is not None:
        level1 = None
        if config.semantic_copy and not (isinstance(level, int) and level != 1):
            level1 = semantic_weights(params, config, semantic, tokens, frame_mask)
        logits = lookup_copy(params, config, logits, h, tokens, weights, level, level1)
    if config.prompt_prior:
        logits = prompt_prior(params, config, logits, tokens, frame_mask, level)
    return logits
