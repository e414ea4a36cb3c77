"""Checks of the paths a training command writes to, made before any work starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class OutputPathError(ValueError):
    """An output path that cannot be (or become) a writable directory."""


def check_output_dir(path: Any, setting: str) -> None:
    """Raise OutputPathError, naming `setting` (e.g. "--out") and the path, when `path`
    cannot be or become a writable directory: it is a file, it lies under a file, or its
    nearest existing directory is not writable by this process."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{setting} {str(path)!r} is a file; expected a directory")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe != path and probe.exists() and not probe.is_dir():
        raise OutputPathError(f"{setting} {str(path)!r} lies under {str(probe)!r}, which is a "
                              "file; expected a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"{setting} {str(path)!r}: the directory {str(probe)!r} is not "
                              "writable")
