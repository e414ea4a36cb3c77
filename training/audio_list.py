"""Which audio files a command works on: files, directories and manifests, resolved to one
ordered list.

    items = collect_audio(["speech/", "extra.wav", "more.jsonl"])

- A sound file is taken as it is; its id is its name without the extension.
- A directory is searched recursively for sound files (sorted). An id is the path relative
  to the directory, without the extension; the speaker is the first directory level below
  it (`root/<speaker>/.../utt.wav`) when the files sit in subdirectories.
- A manifest (`.jsonl`) holds one JSON object per line: `{"path": ..., "id": ...,
  "speaker": ..., "text": ...}`; only `path` is required, and a relative path is relative
  to the manifest's directory. It must be UTF-8 text.
- A folder written by `soundstorm speech-corpus` (it holds `speech-corpus.json`) is read
  through its manifests, which name each utterance's speaker: `train.jsonl` for the
  split "train" (the default), `heldout.jsonl` for "heldout", both for "all"; so is its
  `audio/` folder. Its held-out voices are therefore never mixed into training audio
  unless asked for.

Ids must be unique over the whole list: a clash is an error naming both files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Union

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")
SPEECH_CORPUS_INFO = "speech-corpus.json"   # written last by `soundstorm speech-corpus`
SPLITS = {"train": ("train.jsonl",), "heldout": ("heldout.jsonl",),
          "all": ("train.jsonl", "heldout.jsonl")}


@dataclass(frozen=True)
class AudioItem:
    path: Path
    id: str
    speaker: Optional[str] = None  # a name (manifests may give ints; they become strings)
    text: Optional[str] = None


def is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS


def is_speech_corpus(path: Union[str, Path]) -> bool:
    """Whether `path` is a folder written by `soundstorm speech-corpus`."""
    return (Path(path) / SPEECH_CORPUS_INFO).is_file()


def speech_corpus_root(path: Union[str, Path]) -> Optional[Path]:
    """The speech-corpus folder that `path` is, or whose `audio/` folder it is; else None."""
    path = Path(path)
    if is_speech_corpus(path):
        return path
    if path.name == "audio" and is_speech_corpus(path.parent):
        return path.parent
    return None


def collect_audio(inputs: Union[str, Path, Iterable[Union[str, Path]]],
                  split: Optional[str] = None) -> List[AudioItem]:
    """Resolve files, directories and `.jsonl` manifests to AudioItems, in input order.

    split: which utterances of a speech-corpus folder to take: "train" (default),
    "heldout" or "all". Given explicitly, some input must be such a folder.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = list(inputs)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split = {split!r}: expected one of {', '.join(SPLITS)}")
    if split is not None and not any(speech_corpus_root(raw) for raw in inputs):
        raise ValueError(f"split = {split!r} applies to speech-corpus folders (holding "
                         f"{SPEECH_CORPUS_INFO}), and none of the inputs is one")
    items: List[AudioItem] = []
    for raw in inputs:
        p = Path(raw)
        root = speech_corpus_root(p)
        if root is not None:
            for name in SPLITS[split or "train"]:
                items.extend(_read_manifest(root / name))
        elif p.is_dir():
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
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                 f"column {e.start + 1}); a manifest must be UTF-8") from None
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply; each line must be a flat "
                                 "object such as {\"path\": \"a.wav\"}") from None
            if not isinstance(entry, dict) or "path" not in entry:
                raise ValueError(f"{where}: each line must be a JSON object with a \"path\" "
                                 f"string, got {line.strip()[:80]!r}")
            if not isinstance(entry["path"], str) or not entry["path"] \
                    or "\0" in entry["path"]:
                raise ValueError(f"{where}: \"path\" must be a non-empty string (a file path), "
                                 f"got {entry['path']!r:.80}")
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


__all__ = ["AudioItem", "AUDIO_EXTENSIONS", "SPLITS", "collect_audio", "is_audio",
           "is_speech_corpus", "speech_corpus_root"]
