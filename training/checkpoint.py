"""Training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint is a directory `<out>/checkpoints/step-00001000/`:

    config.json, model.safetensors   exactly what `SoundStorm.save_pretrained` writes, so a
                                     checkpoint is itself a model directory the engine loads
    optimizer.safetensors            the optimizer's tensors ("state.<param>.<name>") and the
                                     CPU/CUDA generator states ("rng.*", uint8)
    state.json                       step, scheduler, data position, optimizer hyper-
                                     parameters, Python and NumPy RNG states, training config

It is assembled in `step-00001000.tmp/` and renamed into place only when complete, so a
process killed at any moment leaves the previous checkpoints intact and no half-written
one under a final name. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from soundstorm.engine.model import CONFIG_FILE, WEIGHTS_FILE, SoundStorm, load_config

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
STATE_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: Union[str, Path]) -> List[Path]:
    """Complete checkpoints under `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _read_state(path: Union[str, Path]) -> Tuple[Path, Any]:
    """A checkpoint directory's state.json: (its path, its parsed content)."""
    state_path = Path(path) / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"not a complete training checkpoint (no {STATE_FILE}): {path}")
    try:
        return state_path, json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{state_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{state_path}: not a checkpoint state (JSON nested too deeply)") from None


def checkpoint_step(path: Union[str, Path]) -> int:
    """The step a checkpoint directory records in its state.json."""
    state_path, state = _read_state(path)
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{state_path}: step = {step!r}, expected an int >= 0")
    return step


def remove_partial(directory: Union[str, Path]) -> None:
    """Delete leftovers of checkpoints whose writing was interrupted. A checkpoint that was
    being replaced by a new copy of the same step (`step-N.old.tmp`) and whose new copy
    never got its final name is put back instead."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob("step-*.old.tmp"):
        final = directory / p.name[:-len(".old.tmp")]
        if not final.exists() and (p / STATE_FILE).is_file():
            p.rename(final)
    for p in directory.glob("step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rng_state() -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
            "numpy": {"kind": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    return tensors, meta


def _set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = meta["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_join(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(directory: Union[str, Path], step: int, model: SoundStorm,
                    optimizer: torch.optim.Optimizer, extra: Dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint `step` under `directory` atomically; keep it and the newest
    `keep - 1` others.

    extra: JSON-serialisable state (scheduler, data position, training config, ...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    tmp = directory / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    rng_tensors, rng_meta = _rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(tmp / OPTIMIZER_FILE),
              metadata={"format": "soundstorm-optimizer"})
    state = {"format_version": STATE_VERSION, "step": step, "optimizer": opt_meta,
             "rng": rng_meta, **extra}
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    for name in (WEIGHTS_FILE, CONFIG_FILE, OPTIMIZER_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step written again after a resume
        old = directory / (final.name + ".old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(directory)
    # Keep the checkpoint just written (complete: it is the one a resume needs) and the
    # newest keep - 1 others; never the other way round, even when a newer checkpoint of
    # an abandoned run (resumed from an older step) is still there.
    others = [p for p in list_checkpoints(directory) if p != final]
    for stale in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Union[str, Path], model: SoundStorm,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> Dict[str, Any]:
    """Restore model (and optimizer, RNG states) from a checkpoint; returns its state.json.

    The checkpoint's model config must equal `model.config`; a mismatch raises ValueError.
    """
    path = Path(path)
    state_path, state = _read_state(path)
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != STATE_VERSION:
        raise ValueError(f"{state_path}: format_version {version!r} is not "
                         f"supported (this version reads {STATE_VERSION})")
    # Any model class with save_pretrained/from_pretrained (SoundStorm, the text model);
    # a class that reads its own config says so with a `load_config` classmethod.
    cls = type(model)
    config = cls.load_config(path) if hasattr(cls, "load_config") else load_config(path)
    if config != model.config:
        diff = {k: (v, getattr(model.config, k)) for k, v in config.to_dict().items()
                if getattr(model.config, k) != v}
        raise ValueError(f"checkpoint {path} holds a model with a different config "
                         f"(field: (checkpoint, requested)) {diff}")
    loaded = cls.from_pretrained(path)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(loaded.state_dict()[name])
    if optimizer is not None:
        tensors = load_file(str(path / OPTIMIZER_FILE))
        device = next(model.parameters()).device
        opt_tensors = {k: v.to(device) if not k.endswith(".step") else v
                       for k, v in tensors.items() if k.startswith("state.")}
        optimizer.load_state_dict(_optimizer_join(opt_tensors, state["optimizer"]))
        if restore_rng:
            _set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")},
                           state["rng"])
    return state
