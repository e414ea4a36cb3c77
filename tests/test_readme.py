"""The README's Python snippets run as written, in order, against the shipped demo models."""

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"),
                      flags=re.S | re.M)


def test_the_readme_has_python_snippets():
    blocks = python_blocks()
    assert len(blocks) >= 6 and any("TextToSpeech" in b for b in blocks)


def test_the_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: the text-to-speech snippet speaks its voice "
                    "prompt with it")
    monkeypatch.chdir(tmp_path)            # snippets that save write here
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {i + 1} fails: {e!r}\n{block}") from e
    assert namespace["wav"].size > 0 and namespace["tokens"].shape[-1] == 4
