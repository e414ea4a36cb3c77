"""Text to speech end to end (paper §5): text -> semantic ids -> codec tokens -> waveform.

    tts = TextToSpeech(text_model, engine, codec, semantic_tokenizer)
    wav = tts.synthesize("Hello there. How are you?", "voice.wav", voice_text="...")
    tts.last_report        # seconds per stage (text_to_semantic, soundstorm, codec), RTF
    for chunk in tts.stream("A long text ...", "voice.wav"):
        play(chunk)        # float32 audio, window by window

The voice prompt is a sound file (or float samples with their rate). Its first
`prompt_seconds` (3 s, a whole number of semantic ids) become SoundStorm's acoustic prompt:
its codec tokens and semantic ids lead the clip (the prompt contract), and the generated
audio after them is returned. With `voice_text`, the transcript of the voice prompt, the
text model is prompted too: it reads the transcript before the text and continues the
prompt's semantic ids, so timing and pace carry over; without it the text model starts
from scratch and only the sound of the voice is prompted.

Long text is split at sentence ends; the sentences go through the text model as one
batch (each with the same voice prompt), their ids are joined, and a clip longer than
SoundStorm's `max_frames` is generated in slide-and-prompt windows (`Engine.stream`).

`semantic_tokenizer` is any object with `tokenize(wav, sr) -> ids [S]`, `rate` and
`vocab_size` (`soundstorm.training.semantic` makes them); the engine does not import the
training package.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from soundstorm.engine.config import DecodeConfig
from soundstorm.engine.text_model import (TURN_MARKER, TextToSemantic, as_text,
                                          encode_text, generate_semantic)

SILENCE_DB = -60.0
MIN_VOICE_SECONDS = 0.5
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


class VoiceError(ValueError):
    """A voice prompt that cannot be used (missing, unreadable, silent, too short)."""


@dataclass
class Voice:
    """A prepared voice prompt."""
    tokens: torch.Tensor            # int64 [P, Q]: codec tokens of the acoustic prompt
    ids: torch.Tensor               # int64 [P_s]: semantic ids of the acoustic prompt
    text_ids: Optional[torch.Tensor] = None   # semantic ids of the whole transcribed prompt
    text: Optional[str] = None      # its transcript


@dataclass
class SpeechReport:
    seconds: Dict[str, float] = field(default_factory=dict)  # per stage, wall time
    audio_seconds: float = 0.0
    sentences: int = 0
    semantic_ids: int = 0
    stopped: List[bool] = field(default_factory=list)       # per sentence: ended by itself
    windows: int = 1

    @property
    def real_time_factor(self) -> float:
        return sum(self.seconds.values()) / self.audio_seconds if self.audio_seconds else math.nan

    def to_dict(self) -> Dict[str, Any]:
        return {"seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "total_seconds": round(sum(self.seconds.values()), 4),
                "audio_seconds": round(self.audio_seconds, 4),
                "real_time_factor": round(self.real_time_factor, 4),
                "sentences": self.sentences, "semantic_ids": self.semantic_ids,
                "stopped": self.stopped, "windows": self.windows}


def split_sentences(text: str, max_symbols: int) -> List[str]:
    """`text` cut at sentence ends (. ! ? ; : followed by space), each piece at most
    `max_symbols` UTF-8 bytes (a longer sentence is cut at spaces, a longer word refused);
    turn markers are kept inside their sentence."""
    pieces: List[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence.encode("utf-8")) <= max_symbols:
            pieces.append(sentence)
            continue
        current = ""
        for word in sentence.split():
            if len(word.encode("utf-8")) > max_symbols:
                raise ValueError(f"the text holds a word of {len(word.encode('utf-8'))} bytes "
                                 f"({word[:20]!r}...); the text model reads at most "
                                 f"{max_symbols} per sentence")
            joined = f"{current} {word}" if current else word
            if len(joined.encode("utf-8")) > max_symbols:
                pieces.append(current)
                current = word
            else:
                current = joined
        if current:
            pieces.append(current)
    return pieces


def check_voice(samples: np.ndarray, rate: int, name: str,
                min_seconds: float = MIN_VOICE_SECONDS) -> None:
    """VoiceError naming `name` for samples [N] at `rate` that are empty, not finite,
    silent (below SILENCE_DB) or shorter than `min_seconds`."""
    if samples.size == 0:
        raise VoiceError(f"{name} holds no samples")
    if not np.isfinite(samples).all():
        raise VoiceError(f"{name} holds NaN or infinity")
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    if level < SILENCE_DB:
        raise VoiceError(f"{name} is silent (RMS level {level:.1f} dBFS, below "
                         f"{SILENCE_DB:g} dBFS)")
    if samples.size / rate < min_seconds:
        raise VoiceError(f"{name} is too short ({samples.size / rate:.3f} s; at least "
                         f"{min_seconds:g} s)")


class TextToSpeech:
    """text_model: a TextToSemantic; soundstorm: an Engine; codec: a Codec whose tokens the
    engine generates; semantic_tokenizer: the tokenizer the two models were trained on."""

    def __init__(self, text_model: TextToSemantic, soundstorm: Any, codec: Any,
                 semantic_tokenizer: Any, prompt_seconds: float = 3.0,
                 max_text_bytes: int = 4000):
        cfg, tcfg = soundstorm.config, text_model.config
        checks = [("semantic vocab_size (text model vs SoundStorm)", tcfg.semantic_vocab_size,
                   cfg.semantic_vocab_size),
                  ("semantic rate (text model vs SoundStorm)", float(tcfg.semantic_rate),
                   float(cfg.semantic_rate)),
                  ("semantic vocab_size (tokenizer vs SoundStorm)",
                   semantic_tokenizer.vocab_size, cfg.semantic_vocab_size),
                  ("semantic rate (tokenizer vs SoundStorm)", float(semantic_tokenizer.rate),
                   float(cfg.semantic_rate)),
                  ("codec num_quantizers", codec.num_quantizers, cfg.num_quantizers),
                  ("codec codebook_size", codec.codebook_size, cfg.codebook_size),
                  ("codec frame_rate", float(codec.frame_rate), float(cfg.frame_rate))]
        for name, got, want in checks:
            if got != want:
                raise ValueError(f"the models disagree: {name}: {got} != {want}")
        if not (isinstance(prompt_seconds, (int, float)) and math.isfinite(prompt_seconds)
                and prompt_seconds > 0):
            raise ValueError(f"prompt_seconds must be > 0, got {prompt_seconds!r}")
        self.text_model, self.engine, self.codec = text_model, soundstorm, codec
        self.semantic_tokenizer = semantic_tokenizer
        self.prompt_seconds = float(prompt_seconds)
        self.max_text_bytes = max_text_bytes
        self.last_report: Optional[SpeechReport] = None

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    # -- the voice ----------------------------------------------------------------------
    def prepare_voice(self, voice_wav: Any, voice_text: Optional[str] = None,
                      sr: Optional[int] = None) -> Voice:
        """A voice prompt from a sound file path, or float samples [N] at `sr`."""
        samples, rate = self._read_voice(voice_wav, sr)
        cfg = self.engine.config
        per_id = float(cfg.frame_rate) / float(cfg.semantic_rate)
        all_ids = torch.as_tensor(self.semantic_tokenizer.tokenize(samples, rate),
                                  dtype=torch.int64).reshape(-1)
        tokens = self.codec.encode(torch.from_numpy(samples)[None], rate)[0]
        # The acoustic prompt: a whole number of semantic ids, and at most half the window.
        n_ids = min(round(self.prompt_seconds * float(cfg.semantic_rate)), len(all_ids),
                    int(tokens.shape[0] / per_id), int(cfg.max_frames // 2 / per_id))
        if n_ids < 1:
            raise VoiceError(f"the voice prompt is too short: {len(samples) / rate:.2f} s "
                             "makes no semantic id")
        frames = int(n_ids * per_id)
        voice = Voice(tokens=tokens[:frames], ids=all_ids[:n_ids])
        if voice_text is not None:
            encode_text(voice_text, None)          # empty or invalid: refused now, by name
            limit = self.text_model.config.max_semantic_len - 2
            if len(all_ids) <= limit // 2:
                voice.text_ids, voice.text = all_ids, voice_text
        return voice

    def _read_voice(self, voice_wav: Any, sr: Optional[int]) -> Tuple[np.ndarray, int]:
        if isinstance(voice_wav, (str, Path)):
            import soundfile as sf

            from soundstorm.engine.codecs.audio import read_audio

            path = Path(voice_wav)
            if not path.is_file():
                raise VoiceError(f"voice prompt {path}: file not found")
            try:
                samples, rate = read_audio(path)
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                raise VoiceError(f"voice prompt {path}: not a readable sound file ({e})") from None
            name = f"voice prompt {path}"
        else:
            if sr is None:
                raise TypeError("voice_wav given as samples needs their rate: sr=")
            samples, rate, name = np.asarray(voice_wav, dtype=np.float32).reshape(-1), sr, \
                "the voice prompt"
        check_voice(samples, rate, name)
        return samples.astype(np.float32), int(rate)

    # -- text -> semantic ids ---------------------------------------------------------------
    def check_text(self, text: Any) -> str:
        """The text as str; ValueError for empty, non-UTF-8 or over-long text."""
        text = as_text(text, "the text")
        size = len(text.encode("utf-8"))
        if not text.replace(TURN_MARKER, " ").strip():
            raise ValueError("the text is empty: nothing to speak")
        if size > self.max_text_bytes:
            raise ValueError(f"the text is too long: {size} bytes, at most "
                             f"{self.max_text_bytes} in one call; split it")
        return text

    def semantic_ids(self, text: str, voice: Voice, seed: int = 0, temperature: float = 0.9,
                     top_k: int = 125) -> Tuple[torch.Tensor, List[bool], int]:
        """(ids [S] of the whole text, stopped per sentence, sentences)."""
        tcfg = self.text_model.config
        room = tcfg.max_text_len - 2 - (len(voice.text.encode("utf-8")) + 1
                                        if voice.text is not None else 0)
        sentences = split_sentences(text, max(16, room))
        prompts = [voice.text_ids] * len(sentences)
        texts = [voice.text] * len(sentences)
        out = generate_semantic(self.text_model, sentences, prompts, texts,
                                seeds=[(seed + i) % 2 ** 63 for i in range(len(sentences))],
                                temperature=temperature, top_k=top_k)
        ids = torch.cat(out.ids) if out.ids else torch.empty(0, dtype=torch.int64)
        return ids, out.stopped, len(sentences)

    # -- the whole chain ----------------------------------------------------------------
    def synthesize(self, text: Any, voice_wav: Any, voice_text: Optional[str] = None,
                   sr: Optional[int] = None, seed: int = 0, temperature: float = 0.9,
                   top_k: int = 125, decode: Optional[DecodeConfig] = None) -> np.ndarray:
        """float32 audio [N] at `sample_rate`: `text` spoken in the voice of `voice_wav` (a
        sound file, samples at `sr`, or a `Voice` from `prepare_voice`), the prompt itself
        not included. The time of each stage is in `last_report`."""
        text = self.check_text(text)
        voice = voice_wav if isinstance(voice_wav, Voice) else \
            self.prepare_voice(voice_wav, voice_text, sr)
        parts = list(self._tokens(text, voice, seed, temperature, top_k, decode))
        if not parts:
            return np.zeros(0, np.float32)
        t0 = time.perf_counter()
        audio = self.codec.decode(torch.cat(parts)[None].cpu())[0].numpy()
        self.last_report.seconds["codec"] += time.perf_counter() - t0
        self.last_report.audio_seconds = audio.size / self.sample_rate
        return audio

    def stream(self, text: Any, voice_wav: Any, voice_text: Optional[str] = None,
               sr: Optional[int] = None, seed: int = 0, temperature: float = 0.9,
               top_k: int = 125, decode: Optional[DecodeConfig] = None) -> Iterator[np.ndarray]:
        """`synthesize` window by window: yields float32 audio chunks as SoundStorm finishes
        each slide-and-prompt window (each decoded by the codec on its own). Inputs are
        checked at the call."""
        text = self.check_text(text)
        voice = voice_wav if isinstance(voice_wav, Voice) else \
            self.prepare_voice(voice_wav, voice_text, sr)
        return self._audio(self._tokens(text, voice, seed, temperature, top_k, decode))

    def _audio(self, parts: Iterator[torch.Tensor]) -> Iterator[np.ndarray]:
        for tokens in parts:
            t0 = time.perf_counter()
            audio = self.codec.decode(tokens[None].cpu())[0].numpy()
            self.last_report.seconds["codec"] += time.perf_counter() - t0
            self.last_report.audio_seconds += audio.size / self.sample_rate
            yield audio

    def _tokens(self, text: str, voice: Voice, seed: int, temperature: float, top_k: int,
                decode: Optional[DecodeConfig]) -> Iterator[torch.Tensor]:
        """The generated codec tokens after the prompt, int64 [n, Q] per window."""
        cfg = self.engine.config
        report = SpeechReport(seconds={"text_to_semantic": 0.0, "soundstorm": 0.0, "codec": 0.0})
        self.last_report = report
        t0 = time.perf_counter()
        ids, stopped, n = self.semantic_ids(text, voice, seed, temperature, top_k)
        report.seconds["text_to_semantic"] = time.perf_counter() - t0
        report.stopped, report.sentences, report.semantic_ids = stopped, n, len(ids)
        if len(ids) == 0:
            return
        semantic = torch.cat([voice.ids, ids])
        overlap = min(round(3.0 * float(cfg.frame_rate)), cfg.max_frames // 2)
        t0 = time.perf_counter()
        windows = self.engine.stream(semantic, prompt=voice.tokens, decode=decode, seed=seed,
                                     overlap=overlap)
        report.windows = 0
        skip = voice.tokens.shape[0]          # the prompt's frames come back first
        for chunk in windows:
            report.seconds["soundstorm"] += time.perf_counter() - t0
            report.windows += 1
            tokens = chunk.tokens[skip:]
            skip = max(0, skip - chunk.tokens.shape[0])
            if tokens.shape[0]:
                yield tokens
            t0 = time.perf_counter()


__all__ = ["TextToSpeech", "SpeechReport", "Voice", "VoiceError", "split_sentences",
           "check_voice"]
