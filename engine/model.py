"""The SoundStorm model (paper §3.1): summed per-frame embeddings, a bidirectional
Conformer, one output head per RVQ level. Plain PyTorch; the fused ops are called through
`self.ops` (see `soundstorm.kernels.dispatch`), the PyTorch references by default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from soundstorm.engine.config import ModelConfig
from soundstorm.engine.files import read_format_json
from soundstorm.kernels import Ops, get_ops

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "soundstorm"
FORMAT_VERSION = 1

Level = Union[int, torch.Tensor, None]


class FeedForward(nn.Module):
    """Pre-norm feed-forward with swish (a Conformer 'half' FFN; the block scales by 1/2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))

    def body(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after the pre-norm (the block fuses that norm with its residual)."""
        return self.down(F.silu(self.up(h), inplace=True))


class RotarySelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], ops: Ops) -> torch.Tensor:
        return self.body(self.norm(x), key_mask, ops)

    def body(self, h: torch.Tensor, key_mask: Optional[torch.Tensor], ops: Ops) -> torch.Tensor:
        B, T, D = h.shape
        # [B, T, 3, H, dh] -> three [B, H, T, dh]
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = ops.rotary_attention(q, k, v, key_mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class ConvModule(nn.Module):
    """norm -> pointwise (GLU pair) -> [GLU, depthwise conv, norm, swish] -> pointwise."""

    def __init__(self, dim: int, inner: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * inner)
        self.depthwise = nn.Conv1d(inner, inner, kernel, padding=kernel // 2, groups=inner)
        self.inner_norm = nn.LayerNorm(inner)
        self.pointwise_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, frame_mask: Optional[torch.Tensor], ops: Ops) -> torch.Tensor:
        return self.body(self.norm(x), frame_mask, ops)

    def body(self, h: torch.Tensor, frame_mask: Optional[torch.Tensor],
             ops: Ops) -> torch.Tensor:
        h = self.pointwise_in(h)
        h = ops.conv_module(h, self.depthwise.weight, self.depthwise.bias,
                            self.inner_norm.weight, self.inner_norm.bias, frame_mask,
                            self.inner_norm.eps)
        return self.pointwise_out(h)


class ConformerBlock(nn.Module):
    """x + FFN/2, + MHSA, + Conv, + FFN/2, then LayerNorm (Gulati et al., 2020)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ff1 = FeedForward(config.dim, config.ff_dim)
        self.attn = RotarySelfAttention(config.dim, config.heads)
        self.conv = ConvModule(config.dim, config.conv_dim, config.conv_kernel)
        self.ff2 = FeedForward(config.dim, config.ff_dim)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, x: torch.Tensor, frame_mask: Optional[torch.Tensor], ops: Ops) -> torch.Tensor:
        # Each residual add is fused with the norm that the next sub-module starts with
        # (`ops.residual_norm` returns the sum and its normalisation).
        x, h = ops.residual_norm(x, self.ff1(x), 0.5, *_norm_args(self.attn.norm))
        x, h = ops.residual_norm(x, self.attn.body(h, frame_mask, ops), 1.0,
                                 *_norm_args(self.conv.norm))
        x, h = ops.residual_norm(x, self.conv.body(h, frame_mask, ops), 1.0,
                                 *_norm_args(self.ff2.norm))
        _, out = ops.residual_norm(x, self.ff2.body(h), 0.5, *_norm_args(self.norm))
        return out


def _norm_args(norm: nn.LayerNorm) -> tuple:
    return norm.weight, norm.bias, norm.eps


class SoundStorm(nn.Module):
    """Bidirectional Conformer over summed semantic + RVQ token embeddings, Q heads.

    Token convention: `tokens[b, t, q]` is a code in [0, C) or C (= `config.mask_id`) for
    MASK. Levels are 1-based in every public argument, as in the paper.
    """

    def __init__(self, config: ModelConfig, ops: Optional[Ops] = None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.ops = ops or get_ops("torch")
        Q, C, D = config.num_quantizers, config.codebook_size, config.dim
        self.semantic_embed = nn.Embedding(config.semantic_vocab_size, D)
        # Level q's code c lives at row q * C + c; the last row is the shared MASK.
        self.acoustic_embed = nn.Embedding(Q * C + 1, D)
        self.blocks = nn.ModuleList(ConformerBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D)
        self.head_weight = nn.Parameter(torch.empty(Q, C, D))
        self.head_bias = nn.Parameter(torch.zeros(Q, C))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Summing Q + 1 unit-variance embeddings would swamp the first LayerNorm's input
        # scale for no benefit; a small init keeps all presets in the same regime.
        for weight in (self.semantic_embed.weight, self.acoustic_embed.weight, self.head_weight):
            nn.init.normal_(weight, std=0.02)
        nn.init.zeros_(self.head_bias)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ------------------------------------------------------------------------
    def forward(self, semantic: torch.Tensor, tokens: torch.Tensor,
                lengths: Optional[torch.Tensor] = None, level: Level = None) -> torch.Tensor:
        """
        semantic: int64 [B, S]    semantic ids at `semantic_rate`; frame t reads index
                                  floor(t * semantic_rate / frame_rate)
        tokens:   int64 [B, T, Q] codes, MASK = codebook_size; frames at or past a row's
                                  length are ignored
        lengths:  int64 [B] real frames per row (1..T), or None for no padding
        level:    int in 1..Q -> logits [B, T, C];
                  int64 [B] (one level per row) -> [B, T, C];
                  None -> [B, T, Q, C] (all heads)
        Only the requested head(s) are computed. Values are not range-checked here (that
        would cost a host sync per pass); `Engine.generate` checks its inputs.
        """
        cfg = self.config
        self._check_shapes(semantic, tokens, lengths)
        B, T, Q = tokens.shape
        frame_mask = None
        if lengths is not None:
            frame_mask = torch.arange(T, device=tokens.device)[None, :] < lengths[:, None]
        num, den = cfg.semantic_index_fraction()
        x = self.ops.summed_embedding(semantic, tokens, self.semantic_embed.weight,
                                      self.acoustic_embed.weight, num, den)
        for block in self.blocks:
            x = block(x, frame_mask, self.ops)
        return self.logits(self.norm(x), level)

    def logits(self, h: torch.Tensor, level: Level) -> torch.Tensor:
        """Apply the head(s) of `level` (see `forward`) to final hidden states [B, T, D]."""
        Q = self.config.num_quantizers
        if level is None:
            return torch.einsum("btd,qcd->btqc", h, self.head_weight) + self.head_bias
        if isinstance(level, torch.Tensor):
            if level.ndim != 1 or level.shape[0] != h.shape[0] or level.is_floating_point():
                raise ValueError(f"level as a tensor must be integer [B] = [{h.shape[0]}], "
                                 f"got {level.dtype} {tuple(level.shape)}")
            idx = level.to(device=h.device, dtype=torch.long) - 1
            w = self.head_weight[idx]                        # [B, C, D]
            return torch.baddbmm(self.head_bias[idx][:, None, :], h, w.transpose(1, 2))
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= Q:
            raise ValueError(f"level must be an int in 1..{Q} (levels are 1-based), a [B] "
                             f"tensor, or None; got {level!r}")
        return F.linear(h, self.head_weight[level - 1], self.head_bias[level - 1])

    def _check_shapes(self, semantic: torch.Tensor, tokens: torch.Tensor,
                      lengths: Optional[torch.Tensor]) -> None:
        cfg = self.config
        if tokens.ndim != 3 or tokens.shape[2] != cfg.num_quantizers:
            raise ValueError(f"tokens must be [B, T, Q={cfg.num_quantizers}], "
                             f"got {tuple(tokens.shape)}")
        B, T, _ = tokens.shape
        if semantic.ndim != 2 or semantic.shape[0] != B:
            raise ValueError(f"semantic must be [B={B}, S], got {tuple(semantic.shape)}")
        if T > cfg.max_frames:
            raise ValueError(f"tokens has {T} frames, more than max_frames={cfg.max_frames}")
        num, den = cfg.semantic_index_fraction()
        if T > 0 and ((T - 1) * num) // den >= semantic.shape[1]:
            raise ValueError(f"semantic has {semantic.shape[1]} ids, too few for {T} frames "
                             f"(needs {((T - 1) * num) // den + 1})")
        if lengths is not None and (lengths.ndim != 1 or lengths.shape[0] != B):
            raise ValueError(f"lengths must be [B={B}], got {tuple(lengths.shape)}")

    # -- weights I/O --------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write `config.json` and `model.safetensors` (float weights as they are)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                  "model": self.config.to_dict()}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # Write to temporary names, then rename: a crash never leaves a half-written model.
        tmp_w, tmp_c = directory / (WEIGHTS_FILE + ".tmp"), directory / (CONFIG_FILE + ".tmp")
        save_file(state, str(tmp_w), metadata={"format": FORMAT_NAME})
        tmp_c.write_text(json.dumps(config, indent=2) + "\n")
        tmp_w.replace(directory / WEIGHTS_FILE)
        tmp_c.replace(directory / CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None) -> "SoundStorm":
        """Load a directory written by `save_pretrained`. Every key and shape is checked;
        the first mismatch raises `ValueError` naming it. Nothing is unpickled."""
        from safetensors import SafetensorError, safe_open

        directory = Path(directory)
        config = load_config(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"model weights not found: {weights}")
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        device = torch.device(device) if device is not None else torch.device("cpu")
        state = {}
        try:
            with safe_open(str(weights), framework="pt", device="cpu") as f:
                found = set(f.keys())
                for key, shape in expected.items():
                    if key not in found:
                        raise ValueError(f"{weights}: missing tensor {key!r} (shape {shape}) "
                                         f"expected by config {directory / CONFIG_FILE}")
                    got = tuple(f.get_slice(key).get_shape())
                    if got != shape:
                        raise ValueError(f"{weights}: tensor {key!r} has shape {got}, "
                                         f"the config expects {shape}")
                unexpected = sorted(found - set(expected))
                if unexpected:
                    raise ValueError(f"{weights}: unexpected tensor {unexpected[0]!r} "
                                     f"({len(unexpected)} unexpected in all)")
                for key in expected:
                    t = f.get_tensor(key)
                    if not t.is_floating_point():
                        raise ValueError(f"{weights}: tensor {key!r} has dtype {t.dtype}, "
                                         "expected a floating-point dtype")
                    state[key] = t.to(device=device, dtype=dtype or t.dtype)
        except SafetensorError as e:
            raise ValueError(f"{weights}: not a readable safetensors file ({e})") from e
        model.load_state_dict(state, assign=True)
        return model.eval()


def load_config(directory: Union[str, Path]) -> ModelConfig:
    """Read and validate `directory/config.json`."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    data = read_format_json(path, FORMAT_NAME, FORMAT_VERSION, f"{FORMAT_NAME} model config")
    if not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: missing the \"model\" object with the ModelConfig fields")
    try:
        return ModelConfig.from_dict(data["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid model config: {e}") from e
