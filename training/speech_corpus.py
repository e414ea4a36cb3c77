"""A reproducible English speech corpus spoken by espeak-ng: the demo's training data.

    soundstorm speech-corpus speech/ --minutes 40 --seed 0

espeak-ng (Debian: `apt-get install espeak-ng`) is a formant synthesiser: it runs offline,
in milliseconds per sentence, and the same text, voice and version give the same samples.
By default twelve voices differ in base accent, espeak voice variant (formant and breath
settings), pitch and speed; two of them are held out of training so that prompts can come
from voices the model never heard. `voice_population(n)` draws hundreds of voices instead:
every English accent x voice variant, each at its own pitch and speed and with its vocal
tract stretched or shortened (a continuous formant warp done by the WORLD vocoder), the
held-out ones built from voice variants that no training voice uses. Sentences come from a
seeded generator over a small grammar, so the text, like the audio, is the same on every
machine for a given seed.

Layout written::

    OUT/audio/<voice>/<voice>-00042.wav     16 kHz mono 16-bit PCM
    OUT/train.jsonl                         {"path", "id", "speaker", "text", "duration"}
    OUT/heldout.jsonl                       the held-out voices' utterances
    OUT/speech-corpus.json                  voices, seed, espeak-ng version, totals (last)
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

SAMPLE_RATE = 16000
INFO_FILE = "speech-corpus.json"
FORMAT_NAME = "soundstorm-speech-corpus"
FORMAT_VERSION = 1
# The held-out voices' sentences come from the stream of seed + this offset.
HELDOUT_STREAM_OFFSET = 1_000_003


@dataclass(frozen=True)
class Voice:
    """One speaker: an espeak-ng voice (`base+variant`) at a pitch (0-99) and speed (wpm),
    its spectral envelope warped in frequency by `warp` (1 = as espeak speaks it; above 1
    the formants move up, as for a shorter vocal tract; below 1 they move down)."""
    name: str
    espeak: str
    pitch: int
    speed: int
    heldout: bool = False
    warp: float = 1.0

    def command(self, exe: str, text: str, path: str) -> List[str]:
        return [exe, "-v", self.espeak, "-p", str(self.pitch), "-s", str(self.speed),
                "-w", path, text]


VOICES = (
    Voice("us-m1", "en-us+m1", 45, 160),
    Voice("us-f1", "en-us+f1", 62, 150),
    Voice("gb-m3", "en-gb+m3", 38, 168),
    Voice("gb-f2", "en-gb+f2", 70, 155),
    Voice("us-m5", "en-us+m5", 32, 174),
    Voice("scot-f4", "en-gb-scotland+f4", 66, 162),
    Voice("us-m7", "en-us+m7", 55, 146),
    Voice("car-f3", "en-029+f3", 76, 158),
    Voice("rp-m2", "en-gb-x-rp+m2", 42, 152),
    Voice("us-f5", "en-us+f5", 82, 168),
    # Held out of training: prompts and targets for the demo and the prompt tests.
    Voice("rp-m6", "en-gb-x-rp+m6", 48, 156, heldout=True),
    Voice("us-f2", "en-us+f2", 68, 164, heldout=True),
)

# English accents of espeak-ng and the voice variants that sound like a person (the robotic,
# whispering and effect variants are left out).
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-gb-x-rp", "en-029")
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Gene2",
    "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen",
    "Storm", "adam", "anika", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb",
    "david", "ed", "edward", "edward2", "grandma", "grandpa", "gustave", "iven", "iven2",
    "iven3", "iven4", "john", "linda", "max", "michel", "miguel", "norbert", "pablo", "paul",
    "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph", "steph2", "steph3",
    "travis", "victor", "zac",
)
PITCH_RANGE = (20, 85)
SPEED_RANGE = (140, 180)
WARP_RANGE = (0.86, 1.16)


def voice_population(count: int, heldout: int = 8, seed: int = 0) -> tuple:
    """`count` distinct voices, the last `heldout` of them held out of training, drawn from
    `seed` (the same voices on every machine).

    Each voice is an accent x voice variant at its own pitch, speed and formant warp
    (uniform in log over WARP_RANGE). A seeded eighth of the voice variants (at least one)
    is kept for the held-out voices, so a held-out voice differs from every training voice
    in its variant, not just in pitch or warp. Training voices take every accent x variant
    pair once before any pair comes again (again at another pitch, speed and warp)."""
    for name, value in (("count", count), ("heldout", heldout), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 0 <= heldout < count:
        raise ValueError(f"heldout must be in [0, count) = [0, {count}), got {heldout}: "
                         f"at least one voice must be left for training")
    rng = random.Random(seed)
    variants = list(VARIANTS)
    rng.shuffle(variants)
    held_variants = variants[:max(1, len(variants) // 8)] if heldout else []
    train_variants = variants[len(held_variants):]

    def draw(pairs: List[tuple], n: int) -> List[tuple]:
        out: List[tuple] = []
        while len(out) < n:
            batch = list(pairs)
            rng.shuffle(batch)
            out.extend(batch[:n - len(out)])
        return out

    voices = []
    for held, (accent, variant) in (
            [(False, p) for p in draw([(a, v) for a in ACCENTS for v in train_variants],
                                      count - heldout)]
            + [(True, p) for p in draw([(a, v) for a in ACCENTS for v in held_variants],
                                       heldout)]):
        index = len(voices)
        warp = math.exp(rng.uniform(math.log(WARP_RANGE[0]), math.log(WARP_RANGE[1])))
        short = accent.replace("en-gb-x-", "").replace("en-gb-", "").replace("en-", "")
        voices.append(Voice(f"v{index:03d}-{short}-{variant.lower()}", f"{accent}+{variant}",
                            pitch=rng.randint(*PITCH_RANGE), speed=rng.randint(*SPEED_RANGE),
                            heldout=held, warp=round(warp, 3)))
    return tuple(voices)


def warp_formants(samples: np.ndarray, sample_rate: int, warp: float) -> np.ndarray:
    """`samples` with the spectral envelope stretched in frequency by `warp` and the pitch
    and timing kept: the WORLD vocoder (pyworld) splits the speech into F0, envelope and
    aperiodicity, the envelope is resampled on a warped frequency axis (vocal-tract-length
    perturbation) and the three are synthesised again. The loudness (RMS) is kept."""
    if not math.isfinite(warp) or not 0.5 <= warp <= 2.0:
        raise ValueError(f"warp must be a factor in [0.5, 2], got {warp!r}")
    if warp == 1.0 or len(samples) == 0:
        return samples.astype(np.float32)
    try:
        with warnings.catch_warnings():  # pyworld imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import pyworld
    except ImportError as e:
        raise RuntimeError("warping a voice's formants needs pyworld (the WORLD vocoder): "
                           "pip install 'soundstorm[demo]'") from e
    x = np.ascontiguousarray(samples, dtype=np.float64)
    f0, times = pyworld.dio(x, sample_rate, frame_period=5.0)
    f0 = pyworld.stonemask(x, f0, times, sample_rate)
    envelope = pyworld.cheaptrick(x, f0, times, sample_rate)
    aperiodicity = pyworld.d4c(x, f0, times, sample_rate)
    bins = envelope.shape[1]
    source = np.clip(np.arange(bins) / warp, 0, bins - 1)
    low = np.minimum(np.floor(source).astype(np.int64), bins - 2)
    frac = source - low
    warped = envelope[:, low] * (1 - frac) + envelope[:, low + 1] * frac
    y = pyworld.synthesize(f0, np.ascontiguousarray(warped), aperiodicity, sample_rate,
                           frame_period=5.0)[:len(x)]
    y = np.pad(y, (0, len(x) - len(y)))
    rms_in, rms_out = np.sqrt(np.mean(x ** 2)), np.sqrt(np.mean(y ** 2))
    if rms_out > 0:
        y *= rms_in / rms_out
    return y.astype(np.float32)


_WORDS = {
    "name": "Stella Oliver Mara Tobias Nadia Felix Ruth Simon Clara Victor Helen Jonas Lucy "
            "Martin Irene Samuel Alice Peter Nora Daniel".split(),
    "adj": "small bright quiet heavy yellow ancient careful silver gentle broken curious "
           "narrow golden tired sudden wooden empty distant friendly crooked warm frozen "
           "green patient noisy".split(),
    "noun": "lantern river garden window letter basket engine island kitchen mountain "
            "teacher rabbit bicycle market candle harbour forest blanket pencil tower "
            "violin carpet shadow bridge orchard station kettle meadow ladder parcel".split(),
    "verb": "found carried painted followed opened noticed repaired borrowed watched "
            "described wrapped measured counted visited cleaned gathered dropped "
            "photographed remembered explained".split(),
    "place": "near the old station|behind the market|across the river|under the stairs|"
             "beside the harbour|at the edge of the forest|in the middle of town|"
             "on the top floor|along the narrow road|inside the empty church".split("|"),
    "time": "this morning|last winter|after dinner|before sunrise|on Tuesday|every "
            "evening|in the spring|at midnight|yesterday afternoon|during the storm"
            .split("|"),
    "adv": "slowly quickly carefully quietly suddenly happily nervously gently proudly "
           "silently".split(),
    "number": "two three four five seven nine eleven twelve fifteen twenty thirty forty "
              "sixty ninety".split(),
}

_TEMPLATES = (
    "{name} {verb} the {adj} {noun} {place}.",
    "{time}, {name} {adv} {verb} a {adj} {noun}.",
    "The {adj} {noun} was {place}, so {name} {verb} it {time}.",
    "Did {name} really see {number} {adj} {noun}s {place}?",
    "{name} and {name2} {verb} {number} {noun}s {time}.",
    "Nobody {verb} the {noun} {place} until {name} arrived {time}.",
    "We {adv} {verb} the {adj} {noun}, and then the {noun2} {place}.",
    "Please ask {name} to bring the {adj} {noun} {place} {time}.",
    "If the {noun} is {adj}, {name} will want {number} more {noun2}s.",
    "{time}, the {adj} {noun} {place} looked {adj2} and {adj3}.",
)


def sentences(seed: int = 0) -> Iterator[str]:
    """An endless, seeded stream of varied English sentences (the same on every machine)."""
    rng = random.Random(seed)
    w = _WORDS
    while True:
        template = rng.choice(_TEMPLATES)
        fill = {k: rng.choice(v) for k, v in w.items()}
        fill["name2"] = rng.choice([n for n in w["name"] if n != fill["name"]])
        fill["noun2"] = rng.choice([n for n in w["noun"] if n != fill["noun"]])
        fill["adj2"], fill["adj3"] = rng.sample([a for a in w["adj"] if a != fill["adj"]], 2)
        text = template.format(**fill)
        yield text[0].upper() + text[1:]


def require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed: it speaks the demo corpus. Install it "
                           "with `apt-get install espeak-ng` (Debian/Ubuntu) or `brew install "
                           "espeak-ng` (macOS)")
    return exe


def speak(text: str, voice: Voice, exe: Optional[str] = None) -> np.ndarray:
    """`text` spoken by `voice`: float32 samples [N] at 16 kHz."""
    import soundfile as sf
    from soundstorm.engine.codecs.audio import resample
    import torch

    exe = exe or require_espeak()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "say.wav")
        run = subprocess.run(voice.command(exe, text, path), capture_output=True, timeout=120)
        if run.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"espeak-ng failed for voice {voice.espeak!r} on {text!r}: "
                               f"{run.stderr.decode(errors='replace').strip()}")
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if sr != SAMPLE_RATE:
        mono = resample(torch.from_numpy(mono)[None], sr, SAMPLE_RATE)[0].numpy()
    return warp_formants(mono, SAMPLE_RATE, voice.warp)


def voice_by_name(name: str) -> Voice:
    for v in VOICES:
        if v.name == name:
            return v
    raise ValueError(f"unknown voice {name!r}; voices: {[v.name for v in VOICES]}")


def write_speech_corpus(out: Any, minutes: float = 40.0, heldout_utterances: int = 24,
                        seed: int = 0, voices: Sequence[Voice] = VOICES, workers: int = 4,
                        progress: bool = True) -> Dict[str, Any]:
    """Speak a corpus into `out` (a new or empty directory); returns its summary.

    minutes:            training audio to make, shared evenly over the training voices.
    heldout_utterances: utterances per held-out voice (their sentences are drawn from a
                        separate seeded stream, so no held-out text is a training text),
                        at most as many as each training voice speaks: a small corpus
                        never holds out more audio than it trains on.
    """
    out = Path(out)
    if not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0:
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    if isinstance(heldout_utterances, bool) or not isinstance(heldout_utterances, int) \
            or heldout_utterances < 0:
        raise ValueError(f"heldout_utterances must be an integer >= 0, got {heldout_utterances!r}")
    train_voices = [v for v in voices if not v.heldout]
    heldout_voices = [v for v in voices if v.heldout]
    if not train_voices:
        raise ValueError("voices has no training voice (all are held out)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; speak the corpus into a new directory")
    exe = require_espeak()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()

    def job(voice: Voice, index: int, text: str) -> Dict[str, Any]:
        samples = speak(text, voice, exe)
        rel = Path("audio") / voice.name / f"{voice.name}-{index:05d}.wav"
        _write_wav(out / rel, samples)
        return {"path": rel.as_posix(), "id": f"{voice.name}/{voice.name}-{index:05d}",
                "speaker": voice.name, "text": text,
                "duration": round(len(samples) / SAMPLE_RATE, 4)}

    out.mkdir(parents=True, exist_ok=True)
    train: List[Dict[str, Any]] = []
    heldout: List[Dict[str, Any]] = []
    target = minutes * 60.0
    texts = sentences(seed)
    bar = tqdm(total=round(target), desc="speaking (training voices)", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of audio [{elapsed}]")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        total, index = 0.0, 0
        while total < target:
            # One round: a new sentence for every training voice.
            futures = [pool.submit(job, v, index, next(texts)) for v in train_voices]
            for f in futures:
                entry = f.result()
                train.append(entry)
                total += entry["duration"]
                bar.update(min(entry["duration"], max(0.0, target - bar.n)))
            index += 1
        bar.close()
        # `index` sentences per training voice: no held-out voice says more.
        per_heldout_voice = min(heldout_utterances, index)
        held_texts = sentences(seed + HELDOUT_STREAM_OFFSET)
        jobs = [(v, i, next(held_texts)) for i in range(per_heldout_voice)
                for v in heldout_voices]
        for f in tqdm([pool.submit(job, *j) for j in jobs], desc="speaking (held-out voices)",
                      unit="utt", disable=not progress):
            heldout.append(f.result())
    for name, entries in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (out / name).write_text("".join(json.dumps(e) + "\n" for e in entries))
    summary = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "seed": seed,
        "sample_rate": SAMPLE_RATE, "espeak_version": version,
        "voices": [asdict(v) for v in voices],
        "train": {"utterances": len(train),
                  "minutes": round(sum(e["duration"] for e in train) / 60, 3)},
        "heldout": {"utterances": len(heldout),
                    "minutes": round(sum(e["duration"] for e in heldout) / 60, 3),
                    "voices": [v.name for v in heldout_voices],
                    "utterances_per_voice": per_heldout_voice,
                    "requested_per_voice": heldout_utterances,
                    "stream_offset": HELDOUT_STREAM_OFFSET},
    }
    (out / INFO_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _write_wav(path: Path, samples: np.ndarray) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(samples, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")


__all__ = ["Voice", "VOICES", "ACCENTS", "VARIANTS", "voice_population", "warp_formants", "SAMPLE_RATE", "HELDOUT_STREAM_OFFSET", "sentences", "speak", "voice_by_name",
           "require_espeak", "write_speech_corpus"]
