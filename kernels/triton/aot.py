"""Ahead-of-time compilation of every Triton kernel for real GPU targets, at a model's
shapes, with no GPU present: `triton.compile` down to a cubin, then the bundled `ptxas
--verbose` report of registers, spills and shared memory.

    python -m soundstorm.kernels.triton.aot                       # paper shapes, sm_80 + sm_90
    python -m soundstorm.kernels.triton.aot --arch 90 --dtype fp16 --json

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).

What compiles here is what the launchers launch. Each op is called on fake tensors at
the given shapes, laid out as the model passes them (q, k, v as views of one fused
projection, and so on), with its kernel launches recorded instead of run; each recorded
launch then goes through the specialisation of Triton's own JIT (`JITFunction.run`):

- a pointer whose address is a multiple of 16 bytes gets `tt.divisibility = 16` (every
  allocation of PyTorch's CUDA allocator is 512-byte aligned, so a tensor's address is
  taken as 512 + its storage offset in bytes);
- an integer argument that is a multiple of 16 gets `tt.divisibility = 16`, and one
  equal to 1 (a unit stride, a 1:2 rate's numerator) becomes a compile-time constant;
- floats and bools are not specialised.

That is the `launch` variant of a kernel: the one a GPU compiles and runs at these
shapes. The `plain` variant compiles the same launch with every specialisation off
(what Triton compiles for arguments that are neither aligned nor special), so both
code paths are checked for spills and shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import KernelParam, create_function_from_signature

from soundstorm.kernels.triton._launch import INTERPRET

# By module path: the package re-exports ops under the names of some of these modules.
attention, conv_module, embedding, resample, residual_norm = (
    importlib.import_module(f"soundstorm.kernels.triton.{name}")
    for name in ("attention", "conv_module", "embedding", "resample", "residual_norm"))
LAUNCHER_MODULES = (attention, conv_module, embedding, resample, residual_norm)

# The paper preset (paper §4.1) at 30 s, one row: kept here as numbers, since kernels
# never import the engine's config. semantic_index_fraction: 25 Hz semantic tokens for
# 50 Hz codec frames, frame t reads semantic index t * 1 // 2.
PAPER_SHAPES = dict(frames=1500, dim=1024, heads=16, head_dim=64, conv_dim=2048,
                    conv_kernel=5, levels=12, codebook=1024, semantic_vocab=1024,
                    semantic_index_fraction=(1, 2), batch=1)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("launch", "plain")
# Where the fake tensors of a recorded launch are taken to start (see the docstring).
ALLOCATION_ALIGNMENT = 512


@dataclass
class Launch:
    """One recorded kernel launch: the @triton.jit function and its arguments."""
    name: str
    fn: object
    grid: tuple
    args: tuple
    kwargs: Dict[str, object]


@dataclass
class Spec:
    """One kernel variant, as `triton.compile` takes it. `constexprs` and `attrs` are
    keyed by argument path, as Triton's JIT keys them: (index,)."""
    name: str
    variant: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[tuple, object]
    attrs: Dict[tuple, list]
    options: Dict[str, object] = field(default_factory=dict)

    @property
    def num_warps(self) -> int:
        return self.options["num_warps"]

    def arg_names(self, paths) -> List[str]:
        return sorted(self.fn.arg_names[p[0]] for p in paths)

    @property
    def divisible_args(self) -> List[str]:
        """Arguments given `tt.divisibility = 16`."""
        return self.arg_names(p for p, a in self.attrs.items()
                              if ["tt.divisibility", 16] in a)

    @property
    def constant_args(self) -> List[str]:
        """Runtime arguments that became compile-time constants (integers equal to 1)."""
        return self.arg_names(p for p in self.constexprs
                              if not self.fn.params[p[0]].is_constexpr)


class _DevicePointer:
    """What Triton's specialisation reads of a tensor argument: dtype and address."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = ALLOCATION_ALIGNMENT + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


@contextlib.contextmanager
def recording_launches() -> Iterator[List[Launch]]:
    """Within this block the launchers' `wrap_triton(kernel)[grid](...)` calls append a
    `Launch` to the yielded list instead of running the kernel."""
    launches: List[Launch] = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                launches.append(Launch(self.fn.__name__, self.fn, tuple(grid), args, kwargs))
            return record

    saved = {module: module.wrap_triton for module in LAUNCHER_MODULES}
    try:
        for module in LAUNCHER_MODULES:
            module.wrap_triton = Recorder
        yield launches
    finally:
        for module, wrap in saved.items():
            module.wrap_triton = wrap


def record_launches(dtype: str, shapes: Dict[str, object] = PAPER_SHAPES) -> List[Launch]:
    """Call every op on fake tensors at `shapes` with float tensors of `dtype`, laid out
    as the model and the decoding step pass them; return the launches, named after the
    kernels (the resampling kernels as resample_candidates[_keep_all], resample_select)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from soundstorm.kernels import triton as ops

    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    f = TORCH_DTYPES[dtype]
    B, T, D = shapes["batch"], shapes["frames"], shapes["dim"]
    H, dh, E = shapes["heads"], shapes["head_dim"], shapes["conv_dim"]
    Q, C, K = shapes["levels"], shapes["codebook"], shapes["conv_kernel"]
    num, den = shapes["semantic_index_fraction"]
    S = ((T - 1) * num) // den + 1
    i64 = dict(dtype=torch.int64)
    named: List[Launch] = []
    with FakeTensorMode(), recording_launches() as launches:
        mask = torch.ones(B, T, dtype=torch.bool)
        calls = [
            ("summed_embedding", lambda: ops.summed_embedding(
                torch.zeros(B, S, **i64), torch.zeros(B, T, Q, **i64),
                torch.empty(shapes["semantic_vocab"], D, dtype=f),
                torch.empty(Q * C + 1, D, dtype=f), num, den)),
            # q, k, v: views of the fused [B, T, 3, H, dh] projection, as the model has them.
            ("rotary_attention", lambda: ops.rotary_attention(
                *torch.empty(B, T, 3, H, dh, dtype=f).permute(2, 0, 3, 1, 4), mask)),
            ("conv_module", lambda: ops.conv_module(
                torch.empty(B, T, 2 * E, dtype=f), torch.empty(E, 1, K, dtype=f),
                torch.empty(E, dtype=f), torch.empty(E, dtype=f), torch.empty(E, dtype=f),
                mask, 1e-5)),
            ("residual_norm", lambda: ops.residual_norm(
                torch.empty(B, T, D, dtype=f), torch.empty(B, T, D, dtype=f), 0.5,
                torch.empty(D, dtype=f), torch.empty(D, dtype=f), 1e-5)),
        ]
        # The decoding step's buffers: one value per row on the device.
        rows = (torch.ones(B, **i64), torch.ones(B, **i64), torch.ones(B, **i64),
                torch.ones(B, dtype=torch.float32), torch.ones(B, dtype=torch.float32),
                torch.ones(B, dtype=torch.bool))
        for keep_all in (False, True):
            calls.append(("resample", lambda keep_all=keep_all: ops.masked_resample(
                torch.empty(B, T, C, dtype=f), torch.zeros(B, T, **i64), mask,
                None if keep_all else torch.ones(B, **i64), *rows,
                any_sample=True, any_noise=True)))
        for op, call in calls:
            start = len(launches)
            call()
            for launch in launches[start:]:
                if op == "resample":
                    launch.name = {"_candidates_kernel": "resample_candidates",
                                   "_select_kernel": "resample_select"}[launch.fn.__name__]
                    if launch.kwargs.get("KEEP_ALL"):
                        launch.name += "_keep_all"
                else:
                    launch.name = op
                named.append(launch)
    return named


def specialise(launch: Launch, arch: int, variant: str = "launch") -> Spec:
    """The kernel variant Triton's JIT compiles for `launch` on sm_`arch` (`launch`), or
    the same launch with every specialisation off (`plain`)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    params = fn.params
    if variant == "plain":
        params = [KernelParam(p.num, p._param, True, True) for p in params]
    binder = create_function_from_signature(fn.signature, params, backend)
    args = [_DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {k: _DevicePointer(v) if isinstance(v, torch.Tensor) else v
              for k, v in launch.kwargs.items()}
    # As `JITFunction.run` completes the options before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    return Spec(launch.name, variant, fn, signature, constexprs, attrs, options.__dict__)


def kernel_specs(dtype: str, arch: int, shapes: Dict[str, object] = PAPER_SHAPES,
                 variants: Tuple[str, ...] = VARIANTS) -> List[Spec]:
    """One `Spec` per kernel launch and variant at `shapes`, float tensors of `dtype`."""
    launches = record_launches(dtype, shapes)
    return [specialise(launch, arch, variant) for variant in variants for launch in launches]


def _ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    """Registers, spill bytes and static shared memory from `ptxas --verbose`."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        r = subprocess.run([str(ptxas), "--verbose", f"--gpu-name=sm_{arch}{suffix}", str(src),
                            "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {r.stderr[-2000:]}")
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_bytes": (int(spill_st.group(1)) if spill_st else 0)
            + (int(spill_ld.group(1)) if spill_ld else 0)}


def ttir_divisible_args(ttir: str, fn) -> List[str]:
    """Names of the kernel arguments that carry `tt.divisibility = 16` in its TTIR (the
    entry function's arguments keep their Python names: `%q_ptr: !tt.ptr<bf16> {...}`)."""
    header = ttir[ttir.index(f"tt.func public @{fn.__name__}("):]
    header = header[:header.index("{\n")]
    found = re.findall(r"%(\w+): [^,{)]*\{tt\.divisibility = 16 : i32\}", header)
    unknown = set(found) - set(fn.arg_names)
    if unknown:
        raise RuntimeError(f"unexpected argument names in the TTIR of {fn.__name__}: {unknown}")
    return sorted(found)


def compile_spec(spec: Spec, arch: int) -> Dict[str, object]:
    """Compile one kernel variant for sm_`arch`; raises on any compiler error."""
    start = time.perf_counter()
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                    attrs=spec.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.options)
    cubin = compiled.asm["cubin"]
    report = _ptxas_report(compiled.asm["ptx"], arch)
    return {"kernel": spec.name, "variant": spec.variant, "arch": f"sm_{arch}",
            "cubin_bytes": len(cubin), "shared_bytes": int(compiled.metadata.shared),
            "num_warps": spec.num_warps, "seconds": round(time.perf_counter() - start, 2),
            "pointer_args": spec.arg_names(
                (i,) for i, t in enumerate(spec.signature.values()) if t.startswith("*")),
            "divisible_args": spec.divisible_args, "constant_args": spec.constant_args,
            "ttir_divisible_args": ttir_divisible_args(compiled.asm["ttir"], spec.fn),
            **report}


def compile_all(archs=(80, 90), dtypes=("bf16",), variants=VARIANTS) -> List[Dict[str, object]]:
    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = []
    for dtype in dtypes:
        for arch in archs:
            for spec in kernel_specs(dtype, arch, variants=variants):
                results.append({"dtype": dtype, **compile_spec(spec, arch)})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"],
                   choices=sorted(TORCH_DTYPES))
    p.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", action="store_true", help="print one JSON list as the last line")
    a = p.parse_args()
    results = compile_all(tuple(a.arch), tuple(a.dtype), tuple(a.variant))
    print(f"{'kernel':<30} {'variant':<7} {'dtype':<5} {'arch':<6} {'regs':>5} {'spill B':>8} "
          f"{'smem B':>8} {'cubin B':>8} {'s':>6}")
    for r in results:
        print(f"{r['kernel']:<30} {r['variant']:<7} {r['dtype']:<5} {r['arch']:<6} "
              f"{r['registers']:>5} {r['spill_bytes']:>8} {r['shared_bytes']:>8} "
              f"{r['cubin_bytes']:>8} {r['seconds']:>6}")
    if a.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
