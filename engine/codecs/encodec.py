"""EnCodec (Défossez et al., 2022) through `transformers.EncodecModel`.

The 24 kHz model: 75 frames/s, codebooks of 1024, and the bandwidth picks Q
(1.5/3/6/12/24 kbps -> 2/4/8/16/32 levels). Weights: `hf download facebook/encodec_24khz
--local-dir DIR`, then `load_codec("encodec", path=DIR, bandwidth=6.0)`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from soundstorm.engine.codecs.hf import HFCodec, load_hf_model

REPO_ID = "facebook/encodec_24khz"
DEFAULT_BANDWIDTH = 6.0


class EncodecCodec(HFCodec):
    """EnCodec tokens [B, T, Q] at 75 Hz (24 kHz model); Q set by `bandwidth` (kbps)."""

    name = "encodec"

    def __init__(self, path: Any = None, bandwidth: Optional[float] = None,
                 random_init: bool = False, config: Optional[dict] = None,
                 device: Any = "cpu", seed: int = 0):
        self.model = load_hf_model("encodec", "encodec", REPO_ID, path, random_init, config,
                                   device, seed)
        cfg = self.model.config
        if cfg.chunk_length_s is not None or cfg.normalize:
            # The 48 kHz model encodes overlapping chunks with one loudness scale per
            # chunk; [B, T, Q] tokens cannot carry those scales back to the decoder.
            raise ValueError(f"encodec: this model encodes in chunks with per-chunk scales "
                             f"(chunk_length_s={cfg.chunk_length_s}, normalize={cfg.normalize}), "
                             f"which [B, T, Q] tokens cannot carry; use the 24 kHz model "
                             f"({REPO_ID})")
        if cfg.audio_channels != 1:
            raise ValueError(f"encodec: only mono models are supported, this one has "
                             f"audio_channels={cfg.audio_channels}")
        bandwidths = [float(b) for b in cfg.target_bandwidths]
        if bandwidth is None:
            bandwidth = DEFAULT_BANDWIDTH if DEFAULT_BANDWIDTH in bandwidths else max(bandwidths)
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) \
                or float(bandwidth) not in bandwidths:
            raise ValueError(f"bandwidth must be one of this EnCodec model's target bandwidths "
                             f"{bandwidths} (kbps), got {bandwidth!r}")
        self.bandwidth = float(bandwidth)
        self._q = self.model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth)
        self.device = next(self.model.parameters()).device

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(wav[:, None].to(self.device), bandwidth=self.bandwidth,
                                return_dict=True)
        codes = out.audio_codes  # [1, B, Q, T]: one chunk, the whole clip
        return codes[0].transpose(1, 2).cpu()

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = tokens.transpose(1, 2)[None].to(self.device)  # [1, B, Q, T]
        audio = self.model.decode(codes, [None], return_dict=True).audio_values
        return audio[:, 0]
