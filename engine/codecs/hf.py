"""Loading `transformers` codec models from a local directory, or with random weights.

Weights come only from a local directory in the usual Hugging Face layout
(`config.json` + `*.safetensors`); nothing is downloaded at run time and nothing is
unpickled. Random weights exist for tests and must be asked for with `random_init=True`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from soundstorm.engine.codecs.audio import require
from soundstorm.engine.codecs.base import Codec


def load_hf_model(codec: str, model_type: str, repo_id: str, path: Any, random_init: bool,
                  config: Optional[dict], device: Any, seed: int = 0):
    """Build a `transformers` audio-codec model in eval mode on `device`.

    codec:      our name for it ("encodec", "dac", "mimi"), for messages.
    model_type: the `model_type` a matching config.json declares ("encodec", "dac", "mimi").
    repo_id:    where the official weights live, for the how-to-get-them message.
    path:       local directory with config.json + *.safetensors (ignored with random_init).
    config:     with random_init, overrides of the default config (e.g. a small model).
    """
    transformers = require("transformers")

    classes = {"encodec": ("EncodecModel", "EncodecConfig"), "dac": ("DacModel", "DacConfig"),
               "mimi": ("MimiModel", "MimiConfig")}[model_type]
    model_cls, config_cls = (getattr(transformers, n) for n in classes)
    if random_init:
        if path is not None:
            raise ValueError(f"load_codec({codec!r}): pass either path=... (trained weights) "
                             f"or random_init=True (random weights, for tests), not both")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict of {config_cls.__name__} fields, "
                            f"got {type(config).__name__}")
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(seed)
            model = model_cls(config_cls(**(config or {})))
        _randomize_empty_codebooks(model, seed)
    else:
        if config is not None:
            raise ValueError(f"load_codec({codec!r}): config= overrides apply only with "
                             f"random_init=True; a weights directory brings its own config.json")
        directory = check_model_directory(
            f"the {codec} codec", f"{codec} weights", model_type, repo_id, path,
            alternative="; or random_init=True for random weights (tests only)")
        model = from_pretrained_complete(model_cls, directory, f"{codec} weights",
                                         how_to_get(repo_id, directory))
    return model.to(device).eval()


def how_to_get(repo_id: str, directory: Any = "DIR", argument: str = "path",
               flag: str = "") -> str:
    return (f"download the weights once with `hf download {repo_id} --local-dir {directory}` "
            f"(huggingface_hub; older versions: `huggingface-cli download ...`) and pass "
            f"{argument}={str(directory)!r}" + (f" ({flag} on the command line)" if flag else ""))


def check_model_directory(user: str, name: str, model_type: str, repo_id: str, path: Any,
                          argument: str = "path", flag: str = "",
                          alternative: str = "") -> Path:
    """The local Hugging Face directory `path` (config.json declaring `model_type` +
    *.safetensors), or an error saying what is wrong and how to get the weights.

    user:        who needs it, in messages ("the encodec codec").
    name:        the directory's name in messages ("encodec weights").
    argument:    the argument that takes the directory (and `flag`, its command-line flag).
    alternative: appended to the message when no path is given.
    """
    def how(directory: Any = "DIR") -> str:
        return how_to_get(repo_id, directory, argument, flag)

    if path is None:
        raise ValueError(f"{user} needs {argument}=DIR, a local directory with the model's "
                         f"config.json and *.safetensors: {how()}{alternative}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{name} directory {str(directory)!r} does not exist: "
                                f"{how(directory)}")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{name} directory {str(directory)!r} has no config.json: "
                                f"{how(directory)}")
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"{name} directory {str(directory)!r} has no *.safetensors "
                                f"file (pickled checkpoints are not loaded): {how(directory)}")
    try:
        declared = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a JSON object: {e}") from None
    except RecursionError:
        raise ValueError(f"{config_file} is not a model config: its JSON is nested too "
                         f"deeply") from None
    if declared != model_type:
        raise ValueError(f"{config_file} declares model_type={declared!r}, but {user} needs "
                         f"model_type={model_type!r}")
    return directory


def from_pretrained_complete(model_cls: Any, directory: Path, name: str, how: str):
    """`model_cls.from_pretrained(directory)` (local safetensors only), refusing a checkpoint
    that lacks any of the model's parameters: transformers fills those with random values
    and only logs it, and a model with random layers would silently produce garbage.
    (Buffers are exempt: some are derived from the config rather than stored.)"""
    model, info = model_cls.from_pretrained(str(directory), local_files_only=True,
                                            use_safetensors=True, output_loading_info=True)
    params = {n for n, _ in model.named_parameters()}
    missing = sorted(k for k in info.get("missing_keys", ()) if k in params)
    if missing:
        raise ValueError(f"{name} in {str(directory)!r} lack {len(missing)} of the model's "
                         f"parameters (first: {missing[0]!r}); is it a checkpoint of a "
                         f"different model or size? {how}")
    return model


def _randomize_empty_codebooks(model: torch.nn.Module, seed: int) -> None:
    # EnCodec and Mimi initialise their k-means codebooks to zeros (trained checkpoints
    # overwrite them): every vector would map to id 0. Random codewords make a random
    # model's ids spread over the codebook, so tests see real, varied tokens. Where the
    # latents are known (`_latent_stats`), codewords are drawn at their scale, as the
    # codecs' own training seeds codebooks from the first batch.
    g = torch.Generator().manual_seed(seed)
    stats = _latent_stats(model, g)
    first = True
    for name, buf in model.named_buffers():
        if name.split(".")[-1] in ("embed", "embed_sum") and not buf.any():
            noise = torch.randn(buf.shape, generator=g)
            if stats is not None and stats[0].shape[-1] == buf.shape[-1]:
                mean, std = stats
                noise = noise * std + (mean if first else 0.0)
                first = False
            buf.copy_(noise)


def _latent_stats(model: torch.nn.Module, g: torch.Generator):
    """Per-channel mean and std [D] of EnCodec's encoder latents on a second of noise;
    None for other models."""
    if type(model).__name__ != "EncodecModel":
        return None
    sr = model.config.sampling_rate
    with torch.no_grad():
        z = model.encoder(0.1 * torch.randn(1, 1, sr, generator=g))[0].T  # [frames, D]
    return z.mean(0), z.std(0).clamp(min=1e-6)


class HFCodec(Codec):
    """What the transformers-backed adapters share: rates, sizes and the device, read off
    `self.model.config`. Subclasses set `self.model` and `self._q` (levels kept) and name
    the config field holding the hop length."""

    HOP_FIELD = "hop_length"

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        return int(getattr(self.model.config, self.HOP_FIELD))

    @property
    def num_quantizers(self) -> int:
        return int(self._q)

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)
