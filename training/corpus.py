"""The on-disk format of a tokenized corpus, its writer and its (memory-mapped) reader.

A corpus is a directory::

    corpus.json                 what the tokens are and which shards exist (written last:
                                a directory without it is an unfinished corpus)
    manifest.jsonl              one JSON object per utterance, in shard order
    shard-00000.acoustic.npy    codec tokens of every utterance of the shard, concatenated
                                along time: [frames, Q], uint16 (int32 if C > 65535)
    shard-00000.semantic.npy    semantic ids, concatenated: [ids], uint16 (or int32)
    shard-00001.acoustic.npy    ...

`corpus.json`::

    {"format": "soundstorm-tokens", "format_version": 1,
     "num_quantizers": 12, "codebook_size": 1024, "semantic_vocab_size": 1024,
     "frame_rate": 50, "semantic_rate": 25,
     "shards": [{"name": "shard-00000", "frames": 1800000, "semantic": 900000}, ...]}

A manifest line::

    {"id": "spk12/book3/utt0042", "shard": "shard-00000", "frame_offset": 0,
     "frames": 731, "semantic_offset": 0, "semantic_length": 366,
     "speaker": 12, "duration": 14.62}

Utterance `u` owns rows `[frame_offset, frame_offset + frames)` of its shard's acoustic
array and `[semantic_offset, semantic_offset + semantic_length)` of its semantic array;
frame t reads semantic id floor(t * semantic_rate / frame_rate), so
`semantic_length >= floor((frames - 1) * semantic_rate / frame_rate) + 1`. `duration` is
in seconds and must agree with `frames / frame_rate` to within one frame.

Shards are plain `.npy` files opened with `numpy.load(mmap_mode="r")`: only the windows a
batch reads are paged in, so a 60k-hour corpus (about 10^10 tokens) never needs to fit in
memory. Only the manifest is held in memory, as a few int64 arrays (~60 bytes an
utterance).

Opening a corpus checks every shard's header against `corpus.json` and every manifest
entry against its shard. A missing or corrupt shard raises `CorpusError` naming the file;
with `on_bad_shard="skip"` it is skipped with a warning instead and counted in
`skipped_shards`. A manifest that disagrees with a shard (an entry past the shard's end,
row totals that do not match) is reported the same way: never silently trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np

from soundstorm.engine.files import read_format_json

FORMAT_NAME = "soundstorm-tokens"
FORMAT_VERSION = 1
CORPUS_FILE = "corpus.json"
MANIFEST_FILE = "manifest.jsonl"
_META_FIELDS = ("num_quantizers", "codebook_size", "semantic_vocab_size", "frame_rate",
                "semantic_rate")
_ENTRY_INT_FIELDS = ("frame_offset", "frames", "semantic_offset", "semantic_length",
                     "speaker")


class CorpusError(ValueError):
    """A corpus that cannot be read as it claims to be; the message names the file."""


def _id_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def _save_npy_atomic(path: Path, data: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class CorpusMeta:
    """What the tokens of a corpus are: the stream shapes and rates a model must match."""
    num_quantizers: int
    codebook_size: int
    semantic_vocab_size: int
    frame_rate: float
    semantic_rate: float

    def rate_fraction(self) -> tuple[int, int]:
        """(num, den): frame t reads semantic index (t * num) // den."""
        from fractions import Fraction
        r = Fraction(str(self.semantic_rate)) / Fraction(str(self.frame_rate))
        return r.numerator, r.denominator


class CorpusWriter:
    """Write a corpus shard by shard (use as a context manager, or call `close`).

    acoustic tokens are [T, Q] integer arrays in [0, codebook_size), semantic ids [S]
    integers in [0, semantic_vocab_size). A shard is flushed to disk once it holds
    `shard_frames` frames, so writing a large corpus needs memory for one shard only.
    """

    def __init__(self, directory: Union[str, Path], num_quantizers: int, codebook_size: int,
                 semantic_vocab_size: int, frame_rate: float = 50, semantic_rate: float = 25,
                 shard_frames: int = 2_000_000):
        self.directory = Path(directory)
        if (self.directory / CORPUS_FILE).exists():
            raise FileExistsError(f"{self.directory} already holds a corpus ({CORPUS_FILE}); "
                                  "write to a new directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.meta = CorpusMeta(num_quantizers, codebook_size, semantic_vocab_size,
                               frame_rate, semantic_rate)
        self.shard_frames = shard_frames
        self._num, self._den = self.meta.rate_fraction()
        self._acoustic: List[np.ndarray] = []
        self._semantic: List[np.ndarray] = []
        self._entries: List[Dict[str, Any]] = []
        self._shards: List[Dict[str, Any]] = []
        self._pending: List[Dict[str, Any]] = []
        self._ids: set = set()
        self._frames = 0
        self._sem = 0
        self._closed = False

    def add(self, utterance_id: str, acoustic: np.ndarray, semantic: np.ndarray,
            speaker: int = 0, duration: Optional[float] = None) -> None:
        if self._closed:
            raise RuntimeError("CorpusWriter is closed")
        m = self.meta
        acoustic, semantic = np.asarray(acoustic), np.asarray(semantic)
        if not isinstance(utterance_id, str) or not utterance_id or utterance_id in self._ids:
            raise ValueError(f"utterance_id must be a new non-empty string, got {utterance_id!r}")
        if acoustic.ndim != 2 or acoustic.shape[1] != m.num_quantizers or acoustic.shape[0] < 1:
            raise ValueError(f"{utterance_id}: acoustic must be [T >= 1, Q={m.num_quantizers}], "
                             f"got {acoustic.shape}")
        if semantic.ndim != 1:
            raise ValueError(f"{utterance_id}: semantic must be [S], got {semantic.shape}")
        for name, x, vocab in (("acoustic", acoustic, m.codebook_size),
                               ("semantic", semantic, m.semantic_vocab_size)):
            if not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"{utterance_id}: {name} must hold integer ids, got {x.dtype}")
            if x.size and (x.min() < 0 or x.max() >= vocab):
                raise ValueError(f"{utterance_id}: {name} ids must lie in 0..{vocab - 1}, got "
                                 f"{x.min()}..{x.max()}")
        T = acoustic.shape[0]
        need = ((T - 1) * self._num) // self._den + 1
        if semantic.shape[0] < need:
            raise ValueError(f"{utterance_id}: {semantic.shape[0]} semantic ids are too few for "
                             f"{T} frames at {m.semantic_rate} -> {m.frame_rate} Hz (need {need})")
        if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or speaker < 0:
            raise ValueError(f"{utterance_id}: speaker must be an int >= 0, got {speaker!r}")
        if duration is None:
            duration = T / m.frame_rate
        self._ids.add(utterance_id)
        self._pending.append({
            "id": utterance_id, "frame_offset": self._frames, "frames": T,
            "semantic_offset": self._sem, "semantic_length": int(semantic.shape[0]),
            "speaker": int(speaker), "duration": round(float(duration), 6)})
        self._acoustic.append(acoustic.astype(_id_dtype(m.codebook_size)))
        self._semantic.append(semantic.astype(_id_dtype(m.semantic_vocab_size)))
        self._frames += T
        self._sem += semantic.shape[0]
        if self._frames >= self.shard_frames:
            self._flush()

    @property
    def num_utterances(self) -> int:
        """Utterances added so far, flushed to a shard or not."""
        return len(self._entries) + len(self._pending)

    @property
    def entries(self) -> List[Dict[str, Any]]:
        """The manifest entries of the flushed shards (every utterance once closed)."""
        return list(self._entries)

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self._shards):05d}"
        _save_npy_atomic(self.directory / f"{name}.acoustic.npy", np.concatenate(self._acoustic))
        _save_npy_atomic(self.directory / f"{name}.semantic.npy", np.concatenate(self._semantic))
        for e in self._pending:
            self._entries.append({**e, "shard": name})
        self._shards.append({"name": name, "frames": self._frames, "semantic": self._sem})
        self._acoustic, self._semantic, self._pending = [], [], []
        self._frames = self._sem = 0

    def close(self) -> Path:
        if self._closed:
            return self.directory
        self._flush()
        order = ("id", "shard", "frame_offset", "frames", "semantic_offset", "semantic_length",
                 "speaker", "duration")
        lines = "".join(json.dumps({k: e[k] for k in order}) + "\n" for e in self._entries)
        _write_text_atomic(self.directory / MANIFEST_FILE, lines)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                **{k: getattr(self.meta, k) for k in _META_FIELDS}, "shards": self._shards}
        _write_text_atomic(self.directory / CORPUS_FILE, json.dumps(meta, indent=1) + "\n")
        self._closed = True
        return self.directory

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


class _Utterances:
    """Sizes shared by a corpus and its views: `ids`, `frames` and `meta` per utterance."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def total_frames(self) -> int:
        return int(self.frames.sum())

    @property
    def hours(self) -> float:
        return self.total_frames / self.meta.frame_rate / 3600


@dataclass
class TokenCorpus(_Utterances):
    """A corpus opened for reading. Per-utterance arrays (int64 [N]) describe every
    utterance kept; shards are memory-mapped."""
    directory: Path
    meta: CorpusMeta
    ids: List[str]
    shard_index: np.ndarray       # [N] index into `shard_names`
    frame_offset: np.ndarray      # [N]
    frames: np.ndarray            # [N]
    semantic_offset: np.ndarray   # [N]
    semantic_length: np.ndarray   # [N]
    speaker: np.ndarray           # [N]
    shard_names: List[str]
    skipped_shards: List[str] = field(default_factory=list)
    _acoustic: List[np.ndarray] = field(default_factory=list, repr=False)
    _semantic: List[np.ndarray] = field(default_factory=list, repr=False)

    def shard_path(self, i: int, kind: str) -> Path:
        return self.directory / f"{self.shard_names[i]}.{kind}.npy"

    def read(self, index: int, frame_start: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """A window of utterance `index`: acoustic int64 [num_frames, Q] from frame
        `frame_start` (a multiple of the rate denominator, so the semantic window stays
        aligned) and the semantic ids int64 [S'] that those frames read."""
        num, den = self.meta.rate_fraction()
        if frame_start % den or frame_start < 0 or num_frames < 1 or \
                frame_start + num_frames > self.frames[index]:
            raise ValueError(f"window [{frame_start}, {frame_start + num_frames}) is not an "
                             f"aligned window of utterance {self.ids[index]!r} "
                             f"({self.frames[index]} frames, starts multiple of {den})")
        s = self.shard_index[index]
        a0 = self.frame_offset[index] + frame_start
        s0 = self.semantic_offset[index] + frame_start * num // den
        sem_len = ((num_frames - 1) * num) // den + 1
        acoustic = np.asarray(self._acoustic[s][a0:a0 + num_frames], dtype=np.int64)
        semantic = np.asarray(self._semantic[s][s0:s0 + sem_len], dtype=np.int64)
        m = self.meta
        for kind, x, vocab in (("acoustic", acoustic, m.codebook_size),
                               ("semantic", semantic, m.semantic_vocab_size)):
            if x.min() < 0 or x.max() >= vocab:
                raise CorpusError(f"{self.shard_path(s, kind)}: utterance {self.ids[index]!r} "
                                  f"holds ids {x.min()}..{x.max()} outside 0..{vocab - 1} "
                                  "(corrupt shard?)")
        return acoustic, semantic


class JoinedCorpus(_Utterances):
    """A read-only view of `corpus` in which utterance i runs on into the next
    `utterances - 1` utterances of its speaker (in corpus order, wrapping round to the
    speaker's first), as one long recording would.

    A corpus of single sentences trains the model only on prompts cut from the sentence it
    continues; the engine is prompted with another recording of the voice. Joined, a
    training window may cross from one sentence into the next, so the prompt and the
    target can come from different sentences, and windows can be as long as the engine's.
    Every utterance still starts one joined utterance, so an epoch visits each once.

    Every part but the last is cut to a whole number of semantic ids (a multiple of the
    rate denominator of frames) so the semantic stream stays aligned across the joins. A
    speaker with fewer than `utterances` utterances has all of them joined once each.
    `groups` (one label per utterance) keeps joins within a group, e.g. a training and a
    validation split of one corpus.
    The view has what the window sampler and dataset read of a `TokenCorpus`: `meta`,
    `directory`, `ids`, `frames`, `speaker`, `len()` and `read`.
    """

    def __init__(self, corpus: TokenCorpus, utterances: int,
                 groups: Optional[np.ndarray] = None):
        if isinstance(utterances, bool) or not isinstance(utterances, int) or utterances < 1:
            raise ValueError(f"utterances must be an integer >= 1, got {utterances!r}")
        if groups is not None and np.shape(groups) != (len(corpus),):
            raise ValueError(f"groups must hold one label per utterance ({len(corpus)}), got "
                             f"shape {np.shape(groups)}")
        self.base = corpus
        self.meta, self.directory = corpus.meta, corpus.directory
        self.skipped_shards = corpus.skipped_shards
        num, den = corpus.meta.rate_fraction()
        self._num, self._den = num, den
        keys = list(zip(corpus.speaker.tolist(), [0] * len(corpus) if groups is None
                        else np.asarray(groups).tolist()))
        by_speaker: Dict[tuple, List[int]] = {}
        for i, key in enumerate(keys):
            by_speaker.setdefault(key, []).append(i)
        position = {i: k for same in by_speaker.values() for k, i in enumerate(same)}
        self._parts: List[List[tuple]] = []   # per joined utterance: (index, frames used)
        for i, key in enumerate(keys):
            same = by_speaker[key]
            chain = [same[(position[i] + j) % len(same)] for j in range(min(utterances, len(same)))]
            parts = [(u, int(corpus.frames[u]) // den * den) for u in chain[:-1]]
            parts = [(u, f) for u, f in parts if f > 0]
            parts.append((chain[-1], int(corpus.frames[chain[-1]])))
            self._parts.append(parts)
        self.ids = ["+".join(corpus.ids[u] for u, _ in parts) for parts in self._parts]
        self.frames = np.array([sum(f for _, f in parts) for parts in self._parts], np.int64)
        self.speaker = corpus.speaker

    def read(self, index: int, frame_start: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """As `TokenCorpus.read`, over joined utterance `index`."""
        num, den = self._num, self._den
        end = frame_start + num_frames
        if frame_start % den or frame_start < 0 or num_frames < 1 or end > self.frames[index]:
            raise ValueError(f"window [{frame_start}, {end}) is not an aligned window of "
                             f"joined utterance {self.ids[index]!r} ({self.frames[index]} "
                             f"frames, starts multiple of {den})")
        acoustic, semantic, offset = [], [], 0
        for u, used in self._parts[index]:
            lo, hi = max(frame_start, offset) - offset, min(end, offset + used) - offset
            offset += used
            if lo >= hi:
                continue
            a, s = self.base.read(u, lo, hi - lo)
            if offset < end:  # a whole part of the window: exactly its frames' ids
                s = s[:(hi - lo) * num // den]
            acoustic.append(a)
            semantic.append(s)
        return np.concatenate(acoustic), np.concatenate(semantic)


def join_utterances(corpus: TokenCorpus, utterances: int,
                    groups: Optional[np.ndarray] = None) -> Union[TokenCorpus, JoinedCorpus]:
    """`corpus` with each utterance joined to its speaker's next ones (`JoinedCorpus`);
    `corpus` itself for utterances = 1 (no view is built: the default costs nothing)."""
    if type(utterances) is int and utterances == 1:
        return corpus
    return JoinedCorpus(corpus, utterances, groups)


def _fail(message: str, on_bad_shard: str, skipped: List[str], shard: str) -> None:
    if on_bad_shard == "raise":
        raise CorpusError(message)
    warnings.warn(f"skipping shard {shard}: {message}", stacklevel=3)
    skipped.append(shard)


def _open_npy(path: Path, rows: int, cols: Optional[int], vocab: int) -> np.ndarray:
    """Memory-map one shard array and check its header; raises CorpusError naming it."""
    if not path.is_file():
        raise CorpusError(f"shard file missing: {path}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorpusError(f"shard file {path} is corrupt or truncated: {e}") from None
    expected = (rows,) if cols is None else (rows, cols)
    if arr.shape != expected:
        raise CorpusError(f"shard file {path} has shape {arr.shape}, {CORPUS_FILE} says "
                          f"{expected} (corrupt, truncated or from another corpus)")
    if not np.issubdtype(arr.dtype, np.integer) or np.iinfo(arr.dtype).max < vocab - 1:
        raise CorpusError(f"shard file {path} has dtype {arr.dtype}, which cannot hold ids "
                          f"up to {vocab - 1}")
    return arr


def _read_meta(directory: Path) -> tuple[CorpusMeta, list]:
    path = directory / CORPUS_FILE
    if not directory.is_dir():
        raise CorpusError(f"corpus directory not found: {directory}")
    if not path.is_file():
        raise CorpusError(f"{path} not found: not a token corpus (or an unfinished one)")
    try:
        data = read_format_json(path, FORMAT_NAME, FORMAT_VERSION, f"{FORMAT_NAME} corpus",
                                error=CorpusError)
    except RecursionError:
        raise CorpusError(f"{path} is not a {FORMAT_NAME} corpus (JSON nested too "
                          "deeply)") from None
    missing = [k for k in _META_FIELDS + ("shards",) if k not in data]
    if missing:
        raise CorpusError(f"{path}: missing field(s) {missing}")
    for k in ("num_quantizers", "codebook_size", "semantic_vocab_size"):
        if not isinstance(data[k], int) or data[k] < 1:
            raise CorpusError(f"{path}: {k} must be a positive int, got {data[k]!r}")
    for k in ("frame_rate", "semantic_rate"):
        if not isinstance(data[k], (int, float)) or not data[k] > 0:
            raise CorpusError(f"{path}: {k} must be a positive number, got {data[k]!r}")
    shards = data["shards"]
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str)
            and isinstance(s.get("frames"), int) and isinstance(s.get("semantic"), int)
            for s in shards):
        raise CorpusError(f"{path}: \"shards\" must be a list of "
                          "{\"name\": str, \"frames\": int, \"semantic\": int}")
    return CorpusMeta(**{k: data[k] for k in _META_FIELDS}), shards


class _Manifest:
    """The manifest as columns: ids (list of str), shard names and per-entry int64 arrays
    (a few tens of bytes an utterance, not a Python dict each)."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise CorpusError(f"manifest not found: {path}")
        self.path = path
        self.ids: List[str] = []
        self.shards: List[str] = []
        shard_of: Dict[str, int] = {}
        cols = {k: array("q") for k in _ENTRY_INT_FIELDS + ("shard", "line")}
        durations = array("d")
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(f"{path}:{line_no}: not UTF-8 text (byte "
                                      f"{raw[err.start]:#04x} at column {err.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{path}:{line_no}: not valid JSON ({err})") from None
                except RecursionError:
                    raise CorpusError(f"{path}:{line_no}: not a manifest entry (JSON nested "
                                      "too deeply)") from None
                if not isinstance(e, dict):
                    e = {}
                bad = [k for k in _ENTRY_INT_FIELDS
                       if isinstance(e.get(k), bool) or not isinstance(e.get(k), int) or e[k] < 0]
                if not isinstance(e.get("id"), str) or not isinstance(e.get("shard"), str) or bad \
                        or isinstance(e.get("duration"), bool) \
                        or not isinstance(e.get("duration"), (int, float)) or e["frames"] < 1:
                    raise CorpusError(f"{path}:{line_no}: malformed entry {line.strip()[:200]} "
                                      f"(need id, shard, non-negative int "
                                      f"{list(_ENTRY_INT_FIELDS)}, frames >= 1, duration)")
                self.ids.append(e["id"])
                if e["shard"] not in shard_of:
                    shard_of[e["shard"]] = len(self.shards)
                    self.shards.append(e["shard"])
                for k in _ENTRY_INT_FIELDS:
                    cols[k].append(e[k])
                cols["shard"].append(shard_of[e["shard"]])
                cols["line"].append(line_no)
                durations.append(float(e["duration"]))
        self.cols = {k: np.frombuffer(v, dtype=np.int64) if len(v) else np.zeros(0, np.int64)
                     for k, v in cols.items()}
        self.duration = np.frombuffer(durations, dtype=np.float64) if len(durations) \
            else np.zeros(0)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.cols['line'][i]} (utterance {self.ids[i]!r})"


def open_corpus(directory: Union[str, Path], on_bad_shard: str = "raise") -> TokenCorpus:
    """Open a corpus written by `CorpusWriter` (or any tool following the format above).

    on_bad_shard: "raise" (default): a missing or corrupt shard, or a manifest that
        disagrees with a shard, raises `CorpusError` naming the file; "skip": such a shard
        and its utterances are left out with a warning, and named in `skipped_shards`.
    """
    if on_bad_shard not in ("raise", "skip"):
        raise ValueError(f"on_bad_shard must be 'raise' or 'skip', got {on_bad_shard!r}")
    directory = Path(directory)
    meta, shard_list = _read_meta(directory)
    m = _Manifest(directory / MANIFEST_FILE)
    num, den = meta.rate_fraction()
    listed = {s["name"] for s in shard_list}
    for j, name in enumerate(m.shards):
        if name not in listed:
            i = int(np.flatnonzero(m.cols["shard"] == j)[0])
            raise CorpusError(f"{m.where(i)} names shard {name!r}, which "
                              f"{directory / CORPUS_FILE} does not list")
    if len(set(m.ids)) != len(m.ids):
        seen: set = set()
        for i, u in enumerate(m.ids):
            if u in seen:
                raise CorpusError(f"{m.where(i)}: duplicate utterance id")
            seen.add(u)
    manifest_index = {name: j for j, name in enumerate(m.shards)}
    # Entries grouped by shard with one sort, not one scan of the manifest per shard.
    by_shard = np.argsort(m.cols["shard"], kind="stable")
    bounds = np.searchsorted(m.cols["shard"][by_shard], np.arange(len(m.shards) + 1))

    skipped: List[str] = []
    names: List[str] = []
    acoustic: List[np.ndarray] = []
    semantic: List[np.ndarray] = []
    keep = np.zeros(len(m.ids), dtype=bool)
    new_index = np.full(len(m.ids), -1, dtype=np.int64)
    for shard in shard_list:
        name = shard["name"]
        try:
            a = _open_npy(directory / f"{name}.acoustic.npy", shard["frames"],
                          meta.num_quantizers, meta.codebook_size)
            s = _open_npy(directory / f"{name}.semantic.npy", shard["semantic"], None,
                          meta.semantic_vocab_size)
        except CorpusError as err:
            _fail(str(err), on_bad_shard, skipped, name)
            continue
        j = manifest_index.get(name)
        rows = by_shard[bounds[j]:bounds[j + 1]] if j is not None else np.zeros(0, np.int64)
        problem = _check_entries(m, rows, shard, meta, num, den, directory)
        if problem:
            _fail(problem, on_bad_shard, skipped, name)
            continue
        keep[rows] = True
        new_index[rows] = len(names)
        names.append(name)
        acoustic.append(a)
        semantic.append(s)
    if skipped:
        warnings.warn(f"{directory}: skipped {len(skipped)} bad shard(s) of {len(shard_list)}: "
                      f"{skipped[:5]}{' ...' if len(skipped) > 5 else ''}", stacklevel=2)
    kept = np.flatnonzero(keep)
    return TokenCorpus(
        directory=directory, meta=meta, ids=[m.ids[i] for i in kept],
        shard_index=new_index[kept],
        frame_offset=m.cols["frame_offset"][kept], frames=m.cols["frames"][kept],
        semantic_offset=m.cols["semantic_offset"][kept],
        semantic_length=m.cols["semantic_length"][kept], speaker=m.cols["speaker"][kept],
        shard_names=names, skipped_shards=skipped, _acoustic=acoustic, _semantic=semantic)


def _check_entries(m: _Manifest, rows: np.ndarray, shard: Dict[str, Any], meta: CorpusMeta,
                   num: int, den: int, directory: Path) -> Optional[str]:
    """Why the manifest entries `rows` of one shard disagree with it, or None."""
    name = shard["name"]
    c = m.cols
    frames, sem_len = c["frames"][rows], c["semantic_length"][rows]
    frame_end = c["frame_offset"][rows] + frames
    sem_end = c["semantic_offset"][rows] + sem_len
    need = ((frames - 1) * num) // den + 1
    tolerance = 1.0 / meta.frame_rate + 1e-6
    checks = [
        (frame_end > shard["frames"], lambda i, j: (
            f"{m.where(i)} ends at frame {frame_end[j]}, past the end of "
            f"{directory / (name + '.acoustic.npy')} ({shard['frames']} frames): the manifest "
            "disagrees with the shard")),
        (sem_end > shard["semantic"], lambda i, j: (
            f"{m.where(i)} ends at semantic id {sem_end[j]}, past the end of "
            f"{directory / (name + '.semantic.npy')} ({shard['semantic']} ids): the manifest "
            "disagrees with the shard")),
        (sem_len < need, lambda i, j: (
            f"{m.where(i)} has {sem_len[j]} semantic ids, too few for its {frames[j]} frames "
            f"(need {need[j]})")),
        (np.abs(m.duration[rows] - frames / meta.frame_rate) > tolerance, lambda i, j: (
            f"{m.where(i)} says duration {m.duration[i]} s but has {frames[j]} frames "
            f"= {frames[j] / meta.frame_rate:g} s at {meta.frame_rate} Hz")),
    ]
    for bad, message in checks:
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            return message(int(rows[j]), j)
    total_frames, total_sem = int(frames.sum()), int(sem_len.sum())
    if total_frames != shard["frames"] or total_sem != shard["semantic"]:
        return (f"the manifest's utterances of shard {name} cover {total_frames} frames and "
                f"{total_sem} semantic ids, but {directory / CORPUS_FILE} says the shard holds "
                f"{shard['frames']} and {shard['semantic']}: the manifest disagrees with the shard")
    return None


def corpus_fingerprint(directory: Union[str, Path]) -> str:
    """SHA-256 of a corpus's corpus.json and manifest.jsonl: it changes when the corpus
    does (shards are named, sized and placed by those two files), not when it moves."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in (CORPUS_FILE, MANIFEST_FILE):
        digest.update(name.encode() + b"\0")
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_corpus(directory: Union[str, Path], utterances: Iterable[Dict[str, Any]],
                 **meta: Any) -> Path:
    """Convenience: write dicts with keys id, acoustic, semantic[, speaker, duration]."""
    with CorpusWriter(directory, **meta) as w:
        for u in utterances:
            w.add(u["id"], u["acoustic"], u["semantic"], u.get("speaker", 0), u.get("duration"))
    return Path(directory)
