"""The offline end-to-end demo: a small SoundStorm trained by this project, speaking in a
voice it never heard.

    soundstorm demo [--out soundstorm-demo/]

The shipped assets (this directory) are:

    model/      the SoundStorm model (safetensors + config.json), trained with
                `soundstorm train` on the espeak-ng speech corpus (see reproduce.sh)
    text-model/ the text-to-semantic model (safetensors + config.json), trained with
                `soundstorm train-text` on the corpus's transcripts: `soundstorm say`
    codec/      the melrvq codec's codebooks (built-in log-mel RVQ + Griffin-Lim)
    semantic/   the semantic tokenizer's k-means (MFCC features, 25 Hz)
    demo.json   the corpus settings the demo draws its held-out speech from

`run_demo` lives in `soundstorm.demo.run`.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent

__all__ = ["ASSETS"]
