"""Reading the project's JSON descriptor files (model, codec and tokenizer configs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Type


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
