"""`XlaEngine`: the engine's `generate` on the XLA path: the checkpoint's weights as JAX
arrays, the whole decode of a batch as one jitted program, rows split over a device mesh.

Inputs are checked by the torch engine's own `prepare` (same errors, same starting state),
the schedule is planned by the torch decoder's planner, and the result has the same form
(int64 [B, T, Q], -1 past each row's length)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from soundstorm.engine.config import DecodeConfig, ModelConfig
from soundstorm.engine.scheduler import length_buckets

# Implementations of the two ops the decode can run as Pallas kernels.
KERNELS = ("jnp", "pallas")


def require_jax() -> None:
    """Raise a clear error when JAX cannot be imported."""
    try:
        import jax  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"backend 'xla' needs JAX, which does not import here ({e}); "
                           "install it with pip install 'soundstorm[xla]'") from e


class XlaEngine:
    """SoundStorm inference on XLA (CPU here, TPU where there is one).

    model_or_dir: a model directory (config.json + model.safetensors) or a torch
                  `SoundStorm` module (its weights are copied).
    Also built by `Engine(model_or_dir, backend="xla")` (see `xla_engine`).

    devices:      None (JAX's default device), an int n (the first n devices), or a
                  sequence of `jax.Device`: rows are split over them (data parallel, each
                  device decodes B / n rows; B is padded up to a multiple of n).
    kernels:      "jnp" (XLA's own fusion) or "pallas" (the Pallas kernels for the summed
                  embedding, attention and masked resampling; interpreted off TPU, so
                  slow there).
    dtype:        "float32" (default) or "bfloat16": weights and activations (norms,
                  softmax, rotary and every accumulation in float32, as on the torch side).
    exact_noise:  True: read Gumbel noise from the 2**23-entry table computed by torch, so
                  the noise equals the torch reference's bit for bit; False: compute
                  -log(-log(u)) (a few ulp away, no 32 MiB table, no gather). None
                  (default): True with kernels="jnp", False with "pallas" (the resampling
                  kernel computes its noise; it cannot read the table).
    """

    backend = "xla"

    def __init__(self, model_or_dir, devices: Union[None, int, Sequence] = None,
                 kernels: str = "jnp", exact_noise: Optional[bool] = None,
                 dtype: str = "float32"):
        require_jax()
        import jax

        from soundstorm.engine.xla.params import load_params, params_from_state

        from soundstorm.engine.xla.params import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if isinstance(model_or_dir, (str, Path)):
            config, params = load_params(model_or_dir, dtype)
        elif hasattr(model_or_dir, "state_dict") and isinstance(
                getattr(model_or_dir, "config", None), ModelConfig):
            config = model_or_dir.config
            params = params_from_state(model_or_dir.state_dict(), config, dtype)
        else:
            raise TypeError("model_or_dir must be a SoundStorm model or a model directory, "
                            f"got {type(model_or_dir).__name__}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {list(KERNELS)}, got {kernels!r}")
        if exact_noise is None:
            exact_noise = kernels == "jnp"
        if not isinstance(exact_noise, bool):
            raise TypeError(f"exact_noise must be a bool or None, got {exact_noise!r}")
        if exact_noise and kernels == "pallas":
            raise ValueError("exact_noise=True needs kernels='jnp': the Pallas resampling "
                             "kernel computes its Gumbel noise (pass exact_noise=False or "
                             "None)")
        self.config = config
        self.kernels = kernels
        self.max_batch = 8
        self._kernel_ops = None
        self.devices = _resolve_devices(devices, jax.devices())
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.params = jax.device_put(params, replicated)
        self.table = None
        if exact_noise:
            from soundstorm.kernels.pallas.rng import gumbel_table

            self.table = jax.device_put(gumbel_table(), replicated)
        import torch

        # What the torch side sees: the weights' dtype, results on the host.
        self.dtype = getattr(torch, dtype)
        self.device = torch.device("cpu")
        self._buckets = length_buckets(config.max_frames)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **kwargs) -> "XlaEngine":
        """An engine over a randomly initialised model of a preset (the same weights as
        `Engine.from_preset(name, seed)`)."""
        import torch

        from soundstorm.engine.model import SoundStorm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SoundStorm(ModelConfig.preset(name))
        return cls(model, **kwargs)

    # `Engine.prepare` reads only `self.config`: the same checks and errors here.
    from soundstorm.engine.engine import Engine as _Engine
    prepare = _Engine.prepare
    del _Engine

    def _ops(self):
        """(embedding, resample, attention) for the program: None for the `jnp` references,
        else the Pallas kernels, interpreted off TPU. Made once: they are static arguments
        of the jitted decode, so a new object would compile it again."""
        if self.kernels == "jnp":
            return None, None, None
        if self._kernel_ops is None:
            import functools

            from soundstorm.kernels.pallas.attention import flash_attention
            from soundstorm.kernels.pallas.embedding import summed_embedding
            from soundstorm.kernels.pallas.resample import masked_resample

            interpret = any(d.platform != "tpu" for d in self.devices)
            self._kernel_ops = (functools.partial(summed_embedding, interpret=interpret),
                                functools.partial(masked_resample, interpret=interpret),
                                functools.partial(flash_attention, interpret=interpret))
        return self._kernel_ops

    def inputs(self, semantic, semantic_lengths=None, prompt=None, prompt_lengths=None,
               decode: Optional[DecodeConfig] = None, seed=None):
        """`generate`'s arguments checked and laid out for the program: (batch, arrays,
        schedule), arrays padded to the length bucket and to a multiple of the devices
        and placed on the mesh (rows split)."""
        import jax

        from soundstorm.engine.xla.decode import plan
        from soundstorm.kernels.pallas.rng import split_seeds

        batch = self.prepare(semantic, semantic_lengths, prompt, prompt_lengths, decode, seed)
        cfg = self.config
        B, T, Q = batch.tokens.shape
        Tb = self._buckets.fit(T)
        n = len(self.devices)
        Bp = -(-B // n) * n
        num, den = cfg.semantic_index_fraction()
        S = ((Tb - 1) * num) // den + 1
        tokens = np.full((Bp, Tb, Q), cfg.mask_id, np.int32)
        tokens[:B, :T] = batch.tokens.numpy()
        sem = np.zeros((Bp, S), np.int32)
        s = min(S, batch.semantic.shape[1])
        sem[:B, :s] = batch.semantic.numpy()[:, :s]
        lengths = np.ones(Bp, np.int32)
        lengths[:B] = batch.frames
        seeds = np.zeros(Bp, np.int64)
        seeds[:B] = batch.seeds.numpy()
        lo, hi = split_seeds(seeds)
        to_decode = list(batch.to_decode) + [0] * (Bp - B)
        schedule = plan(to_decode, batch.steps_per_level, batch.decode)
        rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        steps = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, "data"))
        arrays = [jax.device_put(a, rows) for a in (sem, tokens, lengths, lo, hi)]
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        sched = tuple(jax.device_put(a, steps if i == 5 else replicated)
                      for i, a in enumerate(schedule.arrays()))
        return batch, arrays, sched

    def generate(self, semantic, semantic_lengths=None, prompt=None, prompt_lengths=None,
                 decode: Optional[DecodeConfig] = None, seed=None, on_step=None):
        """`Engine.generate` on XLA: same arguments, checks, errors and result (a torch
        int64 [B, T, Q], frames past a row's length -1). Without `on_step` the whole
        decode is one program; with it, each iteration is one program and `on_step(level,
        iteration, tokens)` sees the tokens between them."""
        import torch

        from soundstorm.engine.xla.decode import sharded_program

        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step must be callable, got {on_step!r}")
        batch, (sem, tokens, lengths, lo, hi), sched = self.inputs(
            semantic, semantic_lengths, prompt, prompt_lengths, decode, seed)
        embedding, resample, attention = self._ops()
        B, T, Q = batch.tokens.shape
        valid = batch.frame_valid.numpy()[..., None]
        program = sharded_program(self.mesh, self.config, embedding, resample, attention,
                                  one_step=on_step is not None)
        if on_step is None:
            out = program(self.params, sem, tokens, lengths, lo, hi, sched, self.table)
        else:
            out = tokens
            for index in range(sched[0].shape[0]):
                out = program(self.params, sem, out, lengths, lo, hi, sched, np.int32(index),
                              self.table)
                now = np.where(valid, np.asarray(out)[:B, :T], -1)
                on_step(int(sched[0][index]), int(sched[1][index]), torch.from_numpy(
                    now.astype(np.int64)))
        result = np.where(valid, np.asarray(out)[:B, :T], -1).astype(np.int64)
        return torch.from_numpy(result)

    def stream(self, semantic, prompt=None, decode: Optional[DecodeConfig] = None,
               seed=None, window: Optional[int] = None, overlap: Optional[int] = None,
               codec=None):
        """`Engine.stream` on XLA: one utterance of any length, slide-and-prompt window by
        window (`soundstorm.engine.longform.stream`), each window one XLA decode."""
        from soundstorm.engine.longform import stream

        return stream(self, semantic, prompt=prompt, decode=decode, seed=seed, window=window,
                      overlap=overlap, codec=codec)


def xla_engine(model_or_dir, device=None, dtype=None, max_batch: int = 8,
               cuda_graphs: Optional[bool] = None, warmup: bool = False,
               **kwargs) -> XlaEngine:
    """`Engine(..., backend="xla")`: an `XlaEngine` from `Engine`'s arguments. device: None
    or "cpu" (where results land; the XLA devices are `devices=`), dtype: None (float32),
    float32 or bfloat16;
    cuda_graphs and warmup do not apply (the program compiles on first use per shape);
    max_batch is kept for callers that read it (one program decodes every row).
    Other keywords go to `XlaEngine` (devices, kernels, exact_noise)."""
    import torch

    from soundstorm.engine.engine import resolve_dtype

    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"backend 'xla' returns tokens on the host; device must be None or "
                         f"'cpu', got {device!r} (choose XLA devices with devices=)")
    resolved = resolve_dtype(dtype)
    if resolved not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"backend 'xla' runs float32 or bfloat16 weights, got dtype {dtype!r}")
    if cuda_graphs:
        raise ValueError("cuda_graphs does not apply to backend 'xla' (one XLA program per "
                         "decode)")
    if warmup:
        raise ValueError("warmup does not apply to backend 'xla': the decode compiles on "
                         "first use of each (batch, length) shape")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    name = "bfloat16" if resolved == torch.bfloat16 else "float32"
    engine = XlaEngine(model_or_dir, dtype=name, **kwargs)
    engine.max_batch = max_batch
    return engine


def _resolve_devices(devices, available) -> list:
    if devices is None:
        return [available[0]]
    if isinstance(devices, bool):
        raise TypeError(f"devices must be None, an int or a sequence of jax devices, got "
                        f"{devices!r}")
    if isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(f"devices = {devices} is out of range; this machine has "
                             f"{len(available)} JAX device(s)")
        return list(available[:devices])
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty; give at least one jax device")
    return devices
