"""Real speech for codec tests: a few English sentences spoken by espeak-ng.

espeak-ng is a system package (Debian: `apt-get install espeak-ng`); tests that need
speech are skipped, saying so, where it is missing.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "Numbers like seven, twelve and ninety nine are spoken clearly.",
)


def require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no real speech "
                    "to test the codecs on")
    return exe


def espeak_corpus(directory: Path, sentences=SENTENCES, voice: str = "en-us") -> list:
    """Speak each sentence to `directory`/sNN.wav (mono 16-bit PCM at 22050 Hz, espeak-ng's
    own rate); returns the paths in sentence order."""
    exe = require_espeak()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(sentences):
        path = directory / f"s{i:02d}.wav"
        subprocess.run([exe, "-v", voice, "-s", "160", "-w", str(path), text],
                       check=True, capture_output=True, timeout=60)
        paths.append(path)
    return paths
