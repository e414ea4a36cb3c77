"""Reading the project's JSON descriptor files (model, codec and tokenizer configs), and
writing a model directory (config + checksummed weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Type

import torch

# safetensors metadata key of the per-tensor sha256 digests (a JSON object).
CHECKSUM_KEY = "tensor_sha256"
# The tensor dtypes a model's weights file may hold, by their safetensors names.
WEIGHT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}


def read_format_json(path: Any, format_name: str, format_version: int, what: str,
                     error: Type[ValueError] = ValueError) -> Dict[str, Any]:
    """The JSON object in `path`, checked to declare `"format": format_name` and
    `"format_version": format_version`; otherwise an `error` (a ValueError) naming the file
    and saying what it is not (`what`: e.g. "soundstorm model config")."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path} is not a {what}: its JSON is nested too deeply") from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise error(f"{path} is not a {what} (expected \"format\": \"{format_name}\")")
    if data.get("format_version") != format_version:
        raise error(f"{path} has format_version {data.get('format_version')!r}; this "
                    f"version reads {format_version}")
    return data


def read_tensor(path: Any, key: str):
    """The tensor `key` of the safetensors file `path`; a ValueError naming the file when it
    is not a safetensors file or lacks the tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if key not in f.keys():
                raise ValueError(f"{path} has no {key!r} tensor")
            return f.get_tensor(key)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def tensor_sha256(tensor) -> str:
    """sha256 (hex) of a CPU tensor's bytes as safetensors stores them (C order)."""
    import torch

    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def write_model_dir(directory: Any, config: Dict[str, Any], state: Dict[str, Any],
                    format_name: str, config_file: str, weights_file: str) -> Path:
    """Write `config` (JSON) and `state` (safetensors, with the sha256 of every tensor in
    its metadata under CHECKSUM_KEY) into `directory` (created if needed). Each file is
    written under a temporary name, then renamed, the config last: a crash never leaves a
    half-written model."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    checksums = {k: tensor_sha256(v) for k, v in state.items()}
    metadata = {"format": format_name, CHECKSUM_KEY: json.dumps(checksums, sort_keys=True)}
    tmp_w, tmp_c = directory / (weights_file + ".tmp"), directory / (config_file + ".tmp")
    save_file(state, str(tmp_w), metadata=metadata)
    tmp_c.write_text(json.dumps(config, indent=2) + "\n")
    tmp_w.replace(directory / weights_file)
    tmp_c.replace(directory / config_file)
    return directory
