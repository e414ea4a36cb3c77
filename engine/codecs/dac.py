"""DAC, the Descript Audio Codec (Kumar et al., 2023), through `transformers.DacModel`.

Models at 16, 24 and 44.1 kHz with codebooks of 1024; `num_quantizers` keeps the first
levels (all by default: 12 for 16 kHz, 32 for 24 kHz, 9 for 44.1 kHz). Weights:
`hf download descript/dac_16khz --local-dir DIR`, then `load_codec("dac", path=DIR)`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from soundstorm.engine.codecs.base import check_levels
from soundstorm.engine.codecs.hf import HFCodec, load_hf_model

REPO_ID = "descript/dac_16khz"


class DacCodec(HFCodec):
    """DAC tokens [B, T, Q] at sample_rate / hop_length frames/s (50 Hz for 16 kHz)."""

    name = "dac"

    def __init__(self, path: Any = None, num_quantizers: Optional[int] = None,
                 random_init: bool = False, config: Optional[dict] = None,
                 device: Any = "cpu", seed: int = 0):
        self.model = load_hf_model("dac", "dac", REPO_ID, path, random_init, config, device, seed)
        total = int(self.model.config.n_codebooks)
        self._q = check_levels(num_quantizers, total, "dac")
        self.device = next(self.model.parameters()).device

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        # DAC's strided encoder drops a trailing partial frame: pad to whole frames so
        # that every sample is encoded and T = ceil(N / hop_length).
        wav = F.pad(wav, (0, -wav.shape[1] % self.hop_length))
        out = self.model.encode(wav[:, None].to(self.device), n_quantizers=self._q,
                                return_dict=True)
        return out.audio_codes[:, : self._q].transpose(1, 2).cpu()  # [B, Q, T] -> [B, T, Q]

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = tokens.transpose(1, 2).to(self.device)  # [B, Q, T]
        audio = self.model.decode(audio_codes=codes, return_dict=True).audio_values
        # With an odd upsampling stride (5 in the 16 and 24 kHz models) DAC's transposed
        # convolutions return a few samples (8 for those) short of T * hop_length: pad the
        # tail so that every codec's output is exactly T * hop_length long.
        want = tokens.shape[1] * self.hop_length
        return F.pad(audio, (0, max(0, want - audio.shape[-1])))[..., :want]

