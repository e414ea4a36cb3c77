"""Which audio files a command works on: files, directories and manifests, resolved to one
ordered list.

    items = collect_audio(["speech/", "extra.wav", "more.jsonl"])

- A sound file is taken as it is; its id is its name without the extension.
- A directory is searched recursively for sound files (sorted). An id is the path relative
  to the directory, without the extension; the speaker is the first directory level below
  it (`root/<speaker>/.../utt.wav`) when the files sit in subdirectories.
- A manifest (`.jsonl`) holds one JSON object per line: `{"path": ..., "id": ...,
  "speaker": ..., "text": ...}`; only `path` is required, and a relative path is relative
  to the manifest's directory.

Ids must be unique over the whole list: a clash is an error naming both files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Union

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")


@dataclass(frozen=True)
class AudioItem:
    path: Path
    id: str
    speaker: Optional[str] = None  # a name (manifests may give ints; they become strings)
    text: Optional[str] = None


def is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS


def collect_audio(inputs: Union[str, Path, Iterable[Union[str, Path]]]) -> List[AudioItem]:
    """Resolve files, directories and `.jsonl` manifests to AudioItems, in input order."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    items: List[AudioItem] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_audio(f))
            if not found:
                raise ValueError(f"directory {str(p)!r} holds no audio files "
                                 f"({', '.join(AUDIO_EXTENSIONS)})")
            for f in found:
                rel = f.relative_to(p)
                speaker = rel.parts[0] if len(rel.parts) > 1 else None
                items.append(AudioItem(f, rel.with_suffix("").as_posix(), speaker))
        elif p.suffix.lower() == ".jsonl":
            items.extend(_read_manifest(p))
        elif p.is_file():
            if not is_audio(p):
                raise ValueError(f"{str(p)!r} is neither a sound file ({', '.join(AUDIO_EXTENSIONS)}) "
                                 "nor a .jsonl manifest nor a directory")
            items.append(AudioItem(p, p.stem))
        else:
            raise FileNotFoundError(f"audio input {str(p)!r} does not exist")
    seen = {}
    for item in items:
        if item.id in seen:
            raise ValueError(f"two inputs have the id {item.id!r}: {str(seen[item.id])!r} and "
                             f"{str(item.path)!r}; give them distinct ids (a manifest's \"id\")")
        seen[item.id] = item.path
    return items


def _read_manifest(path: Path) -> List[AudioItem]:
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                    or not entry["path"]:
                raise ValueError(f"{where}: each line must be a JSON object with a \"path\" "
                                 f"string, got {line.strip()[:80]!r}")
            audio = Path(entry["path"])
            if not audio.is_absolute():
                audio = path.parent / audio
            uid = entry.get("id", audio.stem)
            if not isinstance(uid, str) or not uid:
                raise ValueError(f"{where}: \"id\" must be a non-empty string, got {uid!r}")
            speaker = entry.get("speaker")
            if speaker is not None:
                if isinstance(speaker, bool) or not isinstance(speaker, (str, int)):
                    raise ValueError(f"{where}: \"speaker\" must be a string or an integer, "
                                     f"got {speaker!r}")
                speaker = str(speaker)
            text = entry.get("text")
            items.append(AudioItem(audio, uid, speaker, text if isinstance(text, str) else None))
    return items


__all__ = ["AudioItem", "AUDIO_EXTENSIONS", "collect_audio", "is_audio"]
