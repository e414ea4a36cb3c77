"""Mimi (Défossez et al., 2024, the Moshi codec) through `transformers.MimiModel`.

24 kHz audio at 12.5 frames/s, codebooks of 2048, up to 32 levels (level 1 is the
semantic-distilled one); `num_quantizers` keeps the first levels (all by default; Moshi
uses 8). Weights: `hf download kyutai/mimi --local-dir DIR`, then
`load_codec("mimi", path=DIR, num_quantizers=8)`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from soundstorm.engine.codecs.base import check_levels
from soundstorm.engine.codecs.hf import HFCodec, load_hf_model

REPO_ID = "kyutai/mimi"


class MimiCodec(HFCodec):
    """Mimi tokens [B, T, Q] at 12.5 Hz (24 kHz audio, 1920 samples per frame)."""

    HOP_FIELD = "frame_size"

    name = "mimi"

    def __init__(self, path: Any = None, num_quantizers: Optional[int] = None,
                 random_init: bool = False, config: Optional[dict] = None,
                 device: Any = "cpu", seed: int = 0):
        self.model = load_hf_model("mimi", "mimi", REPO_ID, path, random_init, config,
                                   device, seed)
        cfg = self.model.config
        self._q = check_levels(num_quantizers, int(cfg.num_quantizers), "mimi")
        if self._q < cfg.num_semantic_quantizers:
            raise ValueError(f"num_quantizers must be at least num_semantic_quantizers="
                             f"{cfg.num_semantic_quantizers} for Mimi, got {self._q}")
        self.device = next(self.model.parameters()).device

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(wav[:, None].to(self.device), num_quantizers=self._q,
                                return_dict=True)
        return out.audio_codes.transpose(1, 2).cpu()  # [B, Q, T] -> [B, T, Q]

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = tokens.transpose(1, 2).to(self.device)  # [B, Q, T]
        audio = self.model.decode(codes, return_dict=True).audio_values  # [B, 1, T * hop]
        return audio[:, 0]
