"""Audio codecs: waveform <-> RVQ tokens [B, T, Q] for the engine and the training package.

    codec = load_codec("encodec", path="weights/encodec_24khz", bandwidth=6.0)
    tokens = codec.encode(wav, sr)      # int64 [B, T, Q]
    audio = codec.decode(tokens)        # float32 [B, T * codec.hop_length] at codec.sample_rate

| name      | model                                  | weights                                  |
|-----------|----------------------------------------|------------------------------------------|
| `encodec` | transformers EncodecModel (24 kHz)     | local dir: config.json + *.safetensors   |
| `dac`     | transformers DacModel                  | local dir: config.json + *.safetensors   |
| `mimi`    | transformers MimiModel                 | local dir: config.json + *.safetensors   |
| `melrvq`  | built-in log-mel RVQ + vocoder or G-L  | dir written by training.codec_fit        |

transformers and librosa are imported only when a codec is built, so importing the
engine stays light.
"""

from __future__ import annotations

from typing import Any

from soundstorm.engine.codecs.base import Codec

CODECS = ("encodec", "dac", "mimi", "melrvq")


def load_codec(name: str, path: Any = None, **options: Any) -> Codec:
    """Build the codec `name` from the directory `path`.

    encodec: bandwidth=6.0 (kbps; chooses Q), device="cpu"
    dac:     num_quantizers=None (all levels), device="cpu"
    mimi:    num_quantizers=None (all levels), device="cpu"
      each of these three also takes random_init=True (no path: random weights, tests
      only), config={...} (with random_init: overrides of the default config) and seed=0.
    melrvq:  num_quantizers=None (the first levels only), griffin_lim_iters=None,
             vocoder=None (True: require the learned vocoder; False: Griffin-Lim).

    A missing directory raises FileNotFoundError saying how to get the weights; an
    unknown name or option raises ValueError/TypeError naming it.
    """
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; expected one of {list(CODECS)}")
    if name == "encodec":
        from soundstorm.engine.codecs.encodec import EncodecCodec as cls
    elif name == "dac":
        from soundstorm.engine.codecs.dac import DacCodec as cls
    elif name == "mimi":
        from soundstorm.engine.codecs.mimi import MimiCodec as cls
    else:
        from soundstorm.engine.codecs.melrvq import MelRVQCodec

        cls = MelRVQCodec.load
    try:
        import inspect

        inspect.signature(cls).bind(path, **options)
    except TypeError as e:
        raise TypeError(f"load_codec({name!r}): bad options {sorted(options)}: {e}") from None
    return cls(path, **options)


__all__ = ["CODECS", "Codec", "load_codec"]
