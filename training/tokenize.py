"""Audio in, a training corpus out: codec tokens + semantic ids for every utterance.

    soundstorm tokenize speech/train.jsonl --codec melrvq --codec-path codec/ \\
        --semantic semantic/ --out tokens/

writes a corpus in the format of `soundstorm.training.corpus` (what `soundstorm train`
reads), plus `speakers.json` (speaker name -> the integer in the manifest),
`tokenize-report.json` (what was made, what was skipped and why) and, when the inputs
carry transcripts (manifests with "text", such as `soundstorm speech-corpus` writes),
`texts.jsonl`: one {"id", "text"} per tokenized utterance that has one, in corpus order
(what `soundstorm train-text` pairs with the semantic ids).

A file that cannot be read, holds only silence or is shorter than one codec frame is
skipped and reported by name: one bad file never stops a corpus. The work is resumable:
after every finished shard the state is saved to `tokenize-state.json`, and running the
same command again skips the utterances already in finished shards (settings that differ
from the interrupted run's are refused rather than mixed into one corpus).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from soundstorm.engine.codecs.audio import read_audio
from soundstorm.training.audio_list import AudioItem
from soundstorm.training.corpus import CORPUS_FILE, CorpusWriter

STATE_FILE = "tokenize-state.json"
REPORT_FILE = "tokenize-report.json"
SPEAKERS_FILE = "speakers.json"
TEXTS_FILE = "texts.jsonl"


class _ResumableWriter(CorpusWriter):
    """A CorpusWriter that saves its progress after every shard it flushes."""

    def __init__(self, directory: Path, settings: Dict[str, Any], **meta: Any):
        super().__init__(directory, **meta)
        self.settings = settings

    def restore(self, state: Dict[str, Any]) -> None:
        self._shards = list(state["shards"])
        self._entries = list(state["entries"])
        self._ids = {e["id"] for e in self._entries}

    def _flush(self) -> None:
        had = len(self._shards)
        super()._flush()
        if len(self._shards) > had:
            state = {"settings": self.settings, "shards": self._shards,
                     "entries": self._entries}
            tmp = self.directory / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state) + "\n")
            os.replace(tmp, self.directory / STATE_FILE)


def speaker_ids(items: Sequence[AudioItem]) -> Dict[str, int]:
    """Speaker name -> integer, in sorted order of the names ("unknown" for none given)."""
    names = sorted({item.speaker if item.speaker is not None else "unknown" for item in items})
    return {name: i for i, name in enumerate(names)}


def tokenize_corpus(items: Sequence[AudioItem], codec: Any, semantic: Any, out: Any,
                    shard_frames: int = 2_000_000, silence_db: float = -60.0,
                    provenance: Optional[Dict[str, Any]] = None,
                    progress: bool = True) -> Dict[str, Any]:
    """Tokenize `items` (see `audio_list.collect_audio`) into the corpus directory `out`.

    codec:      a `soundstorm.engine.codecs.Codec` (acoustic tokens).
    semantic:   a `soundstorm.training.semantic.SemanticTokenizer` (semantic ids).
    silence_db: a file whose RMS level is below this (dB re full scale) counts as silent.
    provenance: recorded in the report and checked on resume (e.g. the tokenizers' paths).
    Returns the report (also written to OUT/tokenize-report.json).
    """
    out = Path(out)
    items = list(items)
    if not items:
        raise ValueError("no audio to tokenize: the inputs resolved to an empty list")
    if isinstance(shard_frames, bool) or not isinstance(shard_frames, int) or shard_frames < 1:
        raise ValueError(f"shard_frames must be a positive integer, got {shard_frames!r}")
    if not isinstance(silence_db, (int, float)) or isinstance(silence_db, bool) \
            or not math.isfinite(silence_db) or silence_db > 0:
        raise ValueError(f"silence_db must be a finite level <= 0 dB, got {silence_db!r}")
    if (out / CORPUS_FILE).exists():
        raise FileExistsError(f"{out} already holds a finished corpus ({CORPUS_FILE}); "
                              "tokenize into a new directory")
    speakers = speaker_ids(items)
    fingerprint = hashlib.sha256("\n".join(f"{i.id}\t{i.path}" for i in items)
                                 .encode()).hexdigest()
    settings = {
        "codec": {"name": getattr(codec, "name", type(codec).__name__),
                  "sample_rate": codec.sample_rate, "frame_rate": float(codec.frame_rate),
                  "num_quantizers": codec.num_quantizers, "codebook_size": codec.codebook_size},
        "semantic": {"kind": semantic.kind, "rate": float(semantic.rate),
                     "vocab_size": semantic.vocab_size},
        "inputs": {"count": len(items), "sha256": fingerprint},
        "shard_frames": shard_frames, "silence_db": float(silence_db),
        "provenance": provenance or {},
    }
    state = None
    if (out / STATE_FILE).exists():
        try:
            state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{out / STATE_FILE} is corrupt ({type(e).__name__}); delete "
                             f"{out} and tokenize again") from None
        if not isinstance(state, dict) or not isinstance(state.get("entries"), list) \
                or not isinstance(state.get("shards"), list):
            raise ValueError(f"{out / STATE_FILE} is corrupt (not a tokenize state); delete "
                             f"{out} and tokenize again")
        if state.get("settings") != settings:
            raise ValueError(f"{out} holds an unfinished tokenization with other settings or "
                             f"inputs ({STATE_FILE}); resume it with the same command, or "
                             "tokenize into a new directory")
    writer = _ResumableWriter(out, settings, num_quantizers=codec.num_quantizers,
                              codebook_size=codec.codebook_size,
                              semantic_vocab_size=semantic.vocab_size,
                              frame_rate=float(codec.frame_rate),
                              semantic_rate=float(semantic.rate), shard_frames=shard_frames)
    done = set()
    if state is not None:
        writer.restore(state)
        done = {e["id"] for e in state["entries"]}
    num, den = writer.meta.rate_fraction()
    skipped: List[Dict[str, str]] = []
    todo = [item for item in items if item.id not in done]
    bar = tqdm(todo, desc="tokenizing", unit="file", disable=not progress,
               initial=len(items) - len(todo), total=len(items))
    for item in bar:
        reason, tokens = _tokenize_one(item, codec, semantic, silence_db, num, den)
        if reason is not None:
            skipped.append({"id": item.id, "path": str(item.path), "reason": reason})
            bar.set_postfix(skipped=len(skipped))
            continue
        acoustic, ids, seconds = tokens
        writer.add(item.id, acoustic, ids,
                   speakers[item.speaker if item.speaker is not None else "unknown"], seconds)
    entries = writer.num_utterances
    if entries == 0:
        raise ValueError(f"none of the {len(items)} audio files could be tokenized: "
                         + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5]))
    # Before corpus.json: a finished corpus always has its transcripts.
    gone = {s["id"] for s in skipped}
    lines = [json.dumps({"id": item.id, "text": item.text}, ensure_ascii=False) + "\n"
             for item in items if item.text is not None and item.id not in gone]
    if lines:
        tmp = out / (TEXTS_FILE + ".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, out / TEXTS_FILE)
    writer.close()
    (out / SPEAKERS_FILE).write_text(json.dumps(speakers, indent=1) + "\n")
    frames = sum(e["frames"] for e in writer.entries)
    report = {
        "utterances": entries, "resumed_from": len(done), "skipped": skipped,
        "frames": frames, "hours": round(frames / float(codec.frame_rate) / 3600, 4),
        "speakers": len(speakers), "texts": len(lines), **settings,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    (out / STATE_FILE).unlink(missing_ok=True)
    return report


def _tokenize_one(item: AudioItem, codec: Any, semantic: Any, silence_db: float,
                  num: int, den: int):
    """(reason, None) for a file to skip, else (None, (acoustic [T, Q], ids [S], seconds))."""
    try:
        samples, sr = read_audio(item.path)
    except FileNotFoundError:
        return "missing: the file does not exist", None
    except Exception as e:  # libsndfile raises its own types for every kind of bad file
        return f"unreadable: {type(e).__name__}: {e}", None
    if samples.size == 0:
        return "empty: no samples", None
    if not np.isfinite(samples).all():
        return "corrupt: the samples hold NaN or infinity", None
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    if level < silence_db:
        return f"silent: RMS level {level:.1f} dBFS is below {silence_db:g} dBFS", None
    seconds = len(samples) / sr
    if seconds * float(codec.frame_rate) < 1:
        return f"too short: {seconds * 1000:.1f} ms is less than one codec frame", None
    with torch.no_grad():
        acoustic = codec.encode(torch.from_numpy(samples)[None], sr)[0].cpu().numpy()
        ids = semantic.tokenize(samples, sr)
    ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
    need = ((acoustic.shape[0] - 1) * num) // den + 1
    if len(ids) < need:
        # The two tokenizers round a clip's end differently: at most one id short, which is
        # the last id held for the codec's final partial frame.
        if need - len(ids) > 1:
            raise RuntimeError(f"{item.path}: the semantic tokenizer made {len(ids)} ids for "
                               f"{acoustic.shape[0]} codec frames (needs {need})")
        ids = np.concatenate([ids, np.repeat(ids[-1:], need - len(ids))])
    return None, (acoustic.astype(np.int64), ids.astype(np.int64), seconds)


__all__ = ["tokenize_corpus", "speaker_ids", "STATE_FILE", "REPORT_FILE", "SPEAKERS_FILE",
           "TEXTS_FILE"]
