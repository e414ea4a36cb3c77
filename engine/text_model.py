"""Text to semantic ids (paper §5): a byte-level encoder-decoder in the spirit of ByT5.

    model = TextToSemantic.from_pretrained("text-model/")
    out = generate_semantic(model, ["Hello there."], prompts=[voice_ids],
                            voice_texts=["The voice prompt's words."], seeds=[0])
    out.ids[0]      # int64 [S]: the new semantic ids (after the prompt's), at the semantic rate
    out.stopped[0]  # True: the model ended the utterance; False: it hit the length limit

The encoder reads UTF-8 bytes: the voice prompt's transcript, a separator, the text to
speak, an end symbol. A `TURN_MARKER` character in the text becomes a turn symbol (a change
of speaker in dialogue), never bytes. The decoder is autoregressive over semantic ids (not
deduplicated: one id per semantic frame), started with a begin symbol followed by the
voice prompt's semantic ids, so that it continues in the prompt's timing; it ends the
utterance with its end symbol.

Both stacks are pre-LayerNorm transformers with rotary self-attention; decoding keeps a
key/value cache per layer (the cross-attention keys and values are computed once), samples
with temperature and top-k (the paper: 0.9 and 125) from one seeded generator per row, so a
row's ids do not depend on what it is batched with, and stops at the end symbol or the
length limit. Weights are safetensors + JSON, read with the same checks as the SoundStorm
model (names, shapes, dtypes, sha256 checksums, finite values); nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from soundstorm.engine.files import (CHECKSUM_KEY, WEIGHT_DTYPES, read_format_json,
                                     tensor_sha256, write_model_dir)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "soundstorm-text-to-semantic"
FORMAT_VERSION = 1

# Text symbols: 4 specials, then the 256 byte values.
PAD, END, SEP, TURN = 0, 1, 2, 3
BYTE_OFFSET = 4
TEXT_VOCAB = BYTE_OFFSET + 256
TURN_MARKER = "|"   # in text: a change of speaker (dialogue); encoded as TURN


@dataclass(frozen=True)
class TextModelConfig:
    semantic_vocab_size: int = 256
    semantic_rate: float = 25.0
    dim: int = 256
    heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 3
    ff_dim: int = 1024
    max_text_len: int = 512        # encoder symbols, transcript + text + separators
    max_semantic_len: int = 1024   # decoder positions: begin + prompt ids + new ids + end
    dropout: float = 0.0           # training only

    def __post_init__(self):
        for name in ("semantic_vocab_size", "dim", "heads", "encoder_layers", "decoder_layers",
                     "ff_dim", "max_text_len", "max_semantic_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"text model config: {name} must be an int >= 1, got {v!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"text model config: dim={self.dim} must split into {self.heads} "
                             "heads of an even size")
        r = self.semantic_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                or r <= 0:
            raise ValueError(f"text model config: semantic_rate must be > 0, got {r!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"text model config: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def begin_id(self) -> int:
        return self.semantic_vocab_size

    @property
    def end_id(self) -> int:
        return self.semantic_vocab_size + 1

    @property
    def output_vocab(self) -> int:
        return self.semantic_vocab_size + 2

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TextModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"text model config must be an object, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"text model config: unknown field(s) {unknown}")
        return cls(**data)

    @staticmethod
    def preset_names() -> Tuple[str, ...]:
        return tuple(PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TextModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown text model preset {name!r}; expected one of "
                             f"{list(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_parameters(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in TextToSemantic(self).parameters())


PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(dim=32, heads=2, encoder_layers=1, decoder_layers=1, ff_dim=64,
                 max_text_len=128, max_semantic_len=256),
    "small": dict(dim=192, heads=4, encoder_layers=3, decoder_layers=3, ff_dim=768),
    "base": dict(dim=512, heads=8, encoder_layers=6, decoder_layers=6, ff_dim=2048,
                 max_text_len=1024, max_semantic_len=2048),
}


# -- text ---------------------------------------------------------------------------------
def as_text(text: Any, what: str) -> str:
    """`text` (str or UTF-8 bytes) as a str that encodes to UTF-8; ValueError/TypeError
    naming `what` otherwise."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not UTF-8 text (byte {text[e.start]:#04x} at offset "
                             f"{e.start})") from None
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str (or UTF-8 bytes), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds a character that is not valid Unicode text "
                         f"({e.reason} at position {e.start})") from None
    return text


def _text_bytes(text: Any, what: str) -> List[List[int]]:
    """`text` as byte lists, one per turn (split at TURN_MARKER)."""
    turns = [t.strip().encode("utf-8") for t in as_text(text, what).split(TURN_MARKER)]
    turns = [list(t) for t in turns if t]
    if not turns:
        raise ValueError(f"{what} is empty: nothing to speak")
    return turns


def encode_text(text: Any, voice_text: Any = None,
                max_len: Optional[int] = None) -> torch.Tensor:
    """Encoder symbols int64 [L]: [voice_text bytes] SEP [text bytes, TURN between turns] END.

    Raises ValueError naming the problem for empty text, bytes that are not UTF-8, or (with
    `max_len`) a text longer than the model reads."""
    ids: List[int] = []
    if voice_text is not None:
        for i, turn in enumerate(_text_bytes(voice_text, "the voice prompt's transcript")):
            ids += ([TURN] if i else []) + [b + BYTE_OFFSET for b in turn]
    ids.append(SEP)
    for i, turn in enumerate(_text_bytes(text, "the text")):
        ids += ([TURN] if i else []) + [b + BYTE_OFFSET for b in turn]
    ids.append(END)
    if max_len is not None and len(ids) > max_len:
        raise ValueError(f"the text is too long: {len(ids)} symbols (UTF-8 bytes of the text "
                         f"and the voice prompt's transcript, plus separators), the model "
                         f"reads at most {max_len}; split it into sentences")
    return torch.tensor(ids, dtype=torch.int64)


# -- the network ----------------------------------------------------------------------------
def rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding. x: [B, H, L, d]; positions: int [B, L]."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[:, None, :, None] * inv        # [B, 1, L, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, cross: bool = False):
        super().__init__()
        self.heads, self.cross = heads, cross
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:            # [B, L, D] -> [B, H, L, d]
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, positions: Optional[torch.Tensor]):
        k, v = self.kv(x).chunk(2, dim=-1)
        k, v = self.split(k), self.split(v)
        if positions is not None:
            k = rotary(k, positions)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                dropout: float) -> torch.Tensor:
        """x: [B, L, D]; k, v: [B, H, M, d]; mask: bool [B, 1, L, M] (True = attend)."""
        q = self.split(self.q(x))
        if positions is not None:
            q = rotary(q, positions)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        B, H, L, d = y.shape
        return self.out(y.transpose(1, 2).reshape(B, L, H * d))


class Block(nn.Module):
    def __init__(self, config: TextModelConfig, cross: bool):
        super().__init__()
        D = config.dim
        self.norm1 = nn.LayerNorm(D)
        self.attn = Attention(D, config.heads)
        self.cross = None
        if cross:
            self.norm2 = nn.LayerNorm(D)
            self.cross = Attention(D, config.heads, cross=True)
        self.norm3 = nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, config.ff_dim), nn.GELU(),
                                nn.Linear(config.ff_dim, D))


class TextToSemantic(nn.Module):
    """Byte-level encoder-decoder: text symbols -> semantic ids (see the module docstring)."""

    def __init__(self, config: TextModelConfig):
        super().__init__()
        self.config = config
        D = config.dim
        self.text_embedding = nn.Embedding(TEXT_VOCAB, D)
        self.semantic_embedding = nn.Embedding(config.output_vocab, D)
        self.encoder = nn.ModuleList(Block(config, cross=False) for _ in range(config.encoder_layers))
        self.encoder_norm = nn.LayerNorm(D)
        self.decoder = nn.ModuleList(Block(config, cross=True) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.output_vocab)

    def _drop(self) -> float:
        return self.config.dropout if self.training else 0.0

    def encode(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """text: int [B, L] symbols; text_mask: bool [B, L] (False = padding). -> [B, L, D]"""
        positions = (text_mask.cumsum(1) - 1).clamp(min=0)
        mask = text_mask[:, None, None, :]
        h = self.text_embedding(text)
        for blk in self.encoder:
            x = blk.norm1(h)
            k, v = blk.attn.keys_values(x, positions)
            h = h + F.dropout(blk.attn(x, k, v, mask, positions, self._drop()), self._drop(),
                              self.training)
            h = h + F.dropout(blk.ff(blk.norm3(h)), self._drop(), self.training)
        return self.encoder_norm(h) * text_mask[..., None]

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, inputs: torch.Tensor,
                input_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for training.

        text, text_mask: [B, L] encoder symbols; inputs: int [B, S] decoder inputs (begin,
        prompt ids, target ids), right-padded; input_mask: bool [B, S]. -> float [B, S, V+2]:
        position s predicts input s + 1 (or the end symbol)."""
        memory = self.encode(text, text_mask)
        S = inputs.shape[1]
        positions = torch.arange(S, device=inputs.device).expand(inputs.shape[0], S)
        causal = torch.ones(S, S, dtype=torch.bool, device=inputs.device).tril()
        self_mask = causal[None, None] & input_mask[:, None, None, :]
        cross_mask = text_mask[:, None, None, :]
        h = self.semantic_embedding(inputs)
        for blk in self.decoder:
            x = blk.norm1(h)
            k, v = blk.attn.keys_values(x, positions)
            h = h + F.dropout(blk.attn(x, k, v, self_mask, positions, self._drop()),
                              self._drop(), self.training)
            ck, cv = blk.cross.keys_values(memory, None)
            h = h + F.dropout(blk.cross(blk.norm2(h), ck, cv, cross_mask, None, self._drop()),
                              self._drop(), self.training)
            h = h + F.dropout(blk.ff(blk.norm3(h)), self._drop(), self.training)
        return self.head(self.decoder_norm(h))

    # -- weights I/O --------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write config.json and model.safetensors (with the sha256 of every tensor in the
        file's metadata), each under a temporary name first, then renamed."""
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                  "model": self.config.to_dict()}
        return write_model_dir(directory, config, self.state_dict(), FORMAT_NAME, CONFIG_FILE,
                               WEIGHTS_FILE)

    @classmethod
    def load_config(cls, directory: Union[str, Path]) -> TextModelConfig:
        return load_text_config(directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path],
                        device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None) -> "TextToSemantic":
        """Load a directory written by `save_pretrained`; every problem (config, missing or
        extra tensors, shapes, dtypes, checksums, non-finite values) raises ValueError
        naming the file and the tensor."""
        directory = Path(directory)
        config = load_text_config(directory)
        state = read_text_weights(directory, config)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        device = torch.device(device) if device is not None else torch.device("cpu")
        return model.to(device=device, dtype=dtype).eval()


def load_text_config(directory: Union[str, Path]) -> TextModelConfig:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if directory.is_file():
        raise ValueError(f"{directory} is a file; expected a text model directory "
                         f"({CONFIG_FILE} + {WEIGHTS_FILE})")
    if not path.is_file():
        raise FileNotFoundError(f"text model config not found: {path}")
    data = read_format_json(path, FORMAT_NAME, FORMAT_VERSION, "text-to-semantic model config")
    try:
        return TextModelConfig.from_dict(data.get("model"))
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def read_text_weights(directory: Path, config: TextModelConfig) -> Dict[str, torch.Tensor]:
    """The checked tensors of `directory/model.safetensors` for `config`."""
    from safetensors import SafetensorError, safe_open

    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"text model weights not found: {weights}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in TextToSemantic(config).state_dict().items()}
    state: Dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            found = set(f.keys())
            for key, shape in expected.items():
                if key not in found:
                    raise ValueError(f"{weights}: missing tensor {key!r} (shape {shape}) "
                                     f"expected by {Path(directory) / CONFIG_FILE}")
                info = f.get_slice(key)
                if tuple(info.get_shape()) != shape:
                    raise ValueError(f"{weights}: tensor {key!r} has shape "
                                     f"{tuple(info.get_shape())}, the config expects {shape}")
                if info.get_dtype() not in WEIGHT_DTYPES:
                    raise ValueError(f"{weights}: tensor {key!r} has dtype {info.get_dtype()}, "
                                     "expected float16, bfloat16, float32 or float64")
            unexpected = sorted(found - set(expected))
            if unexpected:
                raise ValueError(f"{weights}: unexpected tensor {unexpected[0]!r} "
                                 f"({len(unexpected)} unexpected in all)")
            metadata = f.metadata() or {}
            checksums = None
            if CHECKSUM_KEY in metadata:
                try:
                    checksums = json.loads(metadata[CHECKSUM_KEY])
                except json.JSONDecodeError:
                    checksums = None
                if not isinstance(checksums, dict) or \
                        not all(isinstance(checksums.get(k), str) for k in expected):
                    raise ValueError(f"{weights}: the {CHECKSUM_KEY!r} metadata is not a "
                                     "checksum for every tensor: the file is corrupt")
            for key in expected:
                t = f.get_tensor(key)
                if checksums is not None and tensor_sha256(t) != checksums[key]:
                    raise ValueError(f"{weights}: tensor {key!r} does not match the sha256 "
                                     "checksum recorded when the file was saved: the file "
                                     "is corrupt")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{weights}: tensor {key!r} holds NaN or infinity")
                state[key] = t
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    return state


# -- decoding ------------------------------------------------------------------------------
@dataclass
class SemanticOutput:
    ids: List[torch.Tensor]      # per row: int64 [S_b], the new ids (not the prompt's)
    stopped: List[bool]          # per row: ended by the end symbol (False: length limit)


def _pad_left(rows: Sequence[torch.Tensor], value: int) -> Tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), value, dtype=torch.int64)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        if len(r):
            out[b, L - len(r):] = r
            mask[b, L - len(r):] = True
    return out, mask


def _pad_right(rows: Sequence[torch.Tensor], value: int) -> Tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), value, dtype=torch.int64)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
        mask[b, :len(r)] = True
    return out, mask


def _check_int(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


@torch.no_grad()
def generate_semantic(model: TextToSemantic, texts: Sequence[Any],
                      prompts: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      voice_texts: Optional[Sequence[Optional[Any]]] = None,
                      seeds: Optional[Sequence[int]] = None, temperature: float = 0.9,
                      top_k: int = 125, max_new_ids: Optional[int] = None,
                      min_new_ids: int = 1) -> SemanticOutput:
    """Sample semantic ids for a batch of texts.

    texts:       B strings (or UTF-8 bytes); TURN_MARKER marks a change of speaker.
    prompts:     per row, the voice prompt's semantic ids int [P_b] (or None).
    voice_texts: per row, the voice prompt's transcript (or None).
    seeds:       per row, an int seed (default 0, 1, ...): a row's ids depend only on its
                 own inputs and seed.
    temperature: softmax temperature (0 = greedy); top_k: sample among the k likeliest ids.
    max_new_ids: the length limit per row (default: as many as the model's positions hold).
    min_new_ids: the end symbol is not drawn before this many ids (1: never an empty row).
    """
    cfg = model.config
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of texts (a list), not one text")
    B = len(texts)
    if B == 0:
        raise ValueError("texts is empty: nothing to generate")
    prompts = list(prompts) if prompts is not None else [None] * B
    voice_texts = list(voice_texts) if voice_texts is not None else [None] * B
    seeds = list(seeds) if seeds is not None else list(range(B))
    for name, seq in (("prompts", prompts), ("voice_texts", voice_texts), ("seeds", seeds)):
        if len(seq) != B:
            raise ValueError(f"{name} has {len(seq)} entries for {B} texts")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    _check_int("top_k", top_k, 1)
    _check_int("min_new_ids", min_new_ids, 0)
    encoded = [encode_text(t, v, cfg.max_text_len) for t, v in zip(texts, voice_texts)]
    starts = []
    for b, p in enumerate(prompts):
        p = torch.empty(0, dtype=torch.int64) if p is None else torch.as_tensor(p)
        if p.ndim != 1 or (p.numel() and (p.dtype.is_floating_point or p.dtype == torch.bool)):
            raise ValueError(f"prompt {b} must be int semantic ids [P], got {p.dtype} "
                             f"{tuple(p.shape)}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= cfg.semantic_vocab_size):
            raise ValueError(f"prompt {b} holds ids outside [0, {cfg.semantic_vocab_size})")
        if len(p) + 2 > cfg.max_semantic_len:
            raise ValueError(f"prompt {b} has {len(p)} ids; the model holds at most "
                             f"{cfg.max_semantic_len - 2} with room for one new id")
        starts.append(torch.cat([torch.tensor([cfg.begin_id]), p.to(torch.int64)]))
    room = cfg.max_semantic_len - max(len(s) for s in starts)
    limit = room if max_new_ids is None else min(_check_int("max_new_ids", max_new_ids, 1), room)
    generators = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 63:
            raise ValueError(f"seeds must be ints in 0..2**63-1, got {s!r}")
        generators.append(torch.Generator().manual_seed(s))

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    text, text_mask = (t.to(device) for t in _pad_right(encoded, PAD))
    memory = model.encode(text, text_mask)
    cross_mask = text_mask[:, None, None, :]
    cross_kv = [blk.cross.keys_values(memory, None) for blk in model.decoder]

    prefix, prefix_mask = (t.to(device) for t in _pad_left(starts, cfg.begin_id))
    P = prefix.shape[1]
    total = P + limit
    H, d = cfg.heads, cfg.dim // cfg.heads
    cache_k = [torch.zeros(B, H, total, d, device=device, dtype=dtype) for _ in model.decoder]
    cache_v = [torch.zeros(B, H, total, d, device=device, dtype=dtype) for _ in model.decoder]
    key_mask = torch.zeros(B, total, dtype=torch.bool, device=device)
    key_mask[:, :P] = prefix_mask
    offset = (~prefix_mask).sum(1)                                   # left padding per row

    def step(inputs: torch.Tensor, start: int) -> torch.Tensor:
        """Run decoder positions [start, start + n) and return the last position's logits."""
        n = inputs.shape[1]
        pos = (torch.arange(start, start + n, device=device)[None] - offset[:, None]).clamp(min=0)
        causal = torch.ones(n, start + n, dtype=torch.bool, device=device).tril(start)
        mask = causal[None, None] & key_mask[:, None, None, :start + n]
        # A left-padding query attends to itself only: a row of all-False would make NaN,
        # which would reach the cache (masked keys still multiply their values by 0).
        diagonal = torch.zeros(n, start + n, dtype=torch.bool, device=device)
        diagonal[:, start:] = torch.eye(n, dtype=torch.bool, device=device)
        mask = mask | diagonal[None, None]
        h = model.semantic_embedding(inputs)
        for i, blk in enumerate(model.decoder):
            x = blk.norm1(h)
            k, v = blk.attn.keys_values(x, pos)
            cache_k[i][:, :, start:start + n] = k
            cache_v[i][:, :, start:start + n] = v
            h = h + blk.attn(x, cache_k[i][:, :, :start + n], cache_v[i][:, :, :start + n],
                             mask, pos, 0.0)
            h = h + blk.cross(blk.norm2(h), *cross_kv[i], cross_mask, None, 0.0)
            h = h + blk.ff(blk.norm3(h))
        return model.head(model.decoder_norm(h[:, -1])).float()

    out = torch.full((B, limit), -1, dtype=torch.int64)
    done = torch.zeros(B, dtype=torch.bool)
    lengths = torch.full((B,), limit, dtype=torch.int64)
    logits = step(prefix, 0)
    allowed = cfg.semantic_vocab_size + 2
    k = min(top_k, allowed)
    for t in range(limit):
        logits[:, cfg.begin_id] = -math.inf                          # never a second begin
        if t < min_new_ids:
            logits[:, cfg.end_id] = -math.inf
        ids = _sample(logits.cpu(), temperature, k, generators)
        ids[done] = cfg.end_id
        newly = (ids == cfg.end_id) & ~done
        lengths[newly] = t
        done |= newly
        out[:, t] = torch.where(done, -1, ids)
        if bool(done.all()) or t == limit - 1:
            break
        key_mask[:, P + t] = True
        logits = step(ids[:, None].to(device), P + t)
    return SemanticOutput(ids=[out[b, :lengths[b]].clone() for b in range(B)],
                          stopped=[bool(x) for x in done])


def _sample(logits: torch.Tensor, temperature: float, k: int,
            generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One id per row from the top-k of softmax(logits / temperature); argmax at 0."""
    if temperature == 0:
        return logits.argmax(-1)
    top, index = logits.topk(k, dim=-1)
    probs = torch.softmax(top.double() / temperature, dim=-1)
    picks = [int(torch.multinomial(probs[b], 1, generator=g)) for b, g in enumerate(generators)]
    return index[torch.arange(len(picks)), torch.tensor(picks)]


__all__ = ["TextModelConfig", "TextToSemantic", "SemanticOutput", "generate_semantic",
           "encode_text", "load_text_config", "TURN_MARKER", "PRESETS"]
