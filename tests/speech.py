"""Real speech for codec tests: a few English sentences spoken by espeak-ng.

espeak-ng is a system package (Debian: `apt-get install espeak-ng`); tests that need
speech are skipped, saying so, where it is missing.
"""

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

from soundstorm.training.speech_corpus import sentences

# Six sentences from the demo corpus's seeded generator (the same on every machine).
SENTENCES = tuple(itertools.islice(sentences(seed=0), 6))


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
