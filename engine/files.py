"""Reading the project's JSON descriptor files (model, codec and tokenizer configs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


def read_format_json(path: Any, format_name: str, format_version: int,
                     what: str) -> Dict[str, Any]:
    """The JSON object in `path`, checked to declare `"format": format_name` and
    `"format_version": format_version`; otherwise a ValueError naming the file and saying
    what it is not (`what`: e.g. "soundstorm model" -> "... is not a soundstorm model
    config")."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise ValueError(f"{path} is not a {what} config (expected \"format\": "
                         f"\"{format_name}\")")
    if data.get("format_version") != format_version:
        raise ValueError(f"{path} has format_version {data.get('format_version')!r}; this "
                         f"version reads {format_version}")
    return data
