"""Ahead-of-time compilation of every Triton kernel for real GPU targets, at a model's
shapes, with no GPU present: `triton.compile` down to a cubin, then the bundled `ptxas
--verbose` report of registers, spills and shared memory.

    python -m soundstorm.kernels.triton.aot                       # paper shapes, sm_80 + sm_90
    python -m soundstorm.kernels.triton.aot --arch 90 --dtype fp16 --json

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled); the launch
parameters come from the same `*_config` helpers the launchers use, so what compiles
here is what the launchers run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import importlib

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from soundstorm.kernels import rng as rng_ref
from soundstorm.kernels.triton._launch import INTERPRET

# By module path: the package re-exports ops under the names of some of these modules.
attention, conv_module, embedding, resample, residual_norm = (
    importlib.import_module(f"soundstorm.kernels.triton.{name}")
    for name in ("attention", "conv_module", "embedding", "resample", "residual_norm"))

# The paper preset (paper §4.1) at 30 s: kept here as numbers, since kernels never
# import the engine's config.
PAPER_SHAPES = dict(frames=1500, dim=1024, heads=16, head_dim=64, conv_dim=2048,
                    conv_kernel=5, levels=12, codebook=1024, semantic_vocab=1024)
TRITON_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass
class Spec:
    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int = 3


def _sig(fn, types: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    return sig


def kernel_specs(dtype: str, shapes: Dict[str, int] = PAPER_SHAPES) -> List[Spec]:
    """One `Spec` per kernel at `shapes` with float tensors of `dtype` (fp32/fp16/bf16)."""
    f = "*" + TRITON_DTYPES[dtype]
    T = shapes["frames"]
    specs = []

    cfg = embedding.embedding_config(shapes["dim"])
    ce = {"BLOCK_F": cfg["BLOCK_F"], "BLOCK_D": cfg["BLOCK_D"]}
    fn = embedding._summed_embedding_kernel
    specs.append(Spec("summed_embedding", fn, _sig(fn, {
        "semantic_ptr": "*i64", "tokens_ptr": "*i64", "sem_table_ptr": f, "ac_table_ptr": f,
        "out_ptr": f}, ce), ce, cfg["num_warps"]))

    cfg = attention.attention_config(T, shapes["head_dim"], fp32=dtype == "fp32")
    ce = {"HEAD_DIM": shapes["head_dim"], "BLOCK_D": cfg["BLOCK_D"], "BLOCK_M": cfg["BLOCK_M"],
          "BLOCK_N": cfg["BLOCK_N"], "HAS_MASK": True, "LOW_PRECISION_DOT": dtype != "fp32",
          "FP32_INPUTS": dtype == "fp32"}
    fn = attention._rotary_attention_kernel
    specs.append(Spec("rotary_attention", fn, _sig(fn, {
        "q_ptr": f, "k_ptr": f, "v_ptr": f, "o_ptr": f, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
        "mask_ptr": "*i1", "len_ptr": "*i32", "qk_scale": "fp32"}, ce), ce,
        cfg["num_warps"], cfg["num_stages"]))

    cfg = conv_module.conv_config(shapes["conv_dim"], T)
    ce = {"K": shapes["conv_kernel"], "HAS_MASK": True, "BLOCK_T": cfg["BLOCK_T"],
          "BLOCK_E": cfg["BLOCK_E"]}
    fn = conv_module._conv_module_kernel
    specs.append(Spec("conv_module", fn, _sig(fn, {
        "h_ptr": f, "w_ptr": f, "bias_ptr": f, "norm_w_ptr": f, "norm_b_ptr": f,
        "mask_ptr": "*i1", "out_ptr": f, "eps": "fp32"}, ce), ce, cfg["num_warps"]))

    cfg = residual_norm.residual_norm_config(shapes["dim"])
    ce = {"BLOCK_R": cfg["BLOCK_R"], "BLOCK_D": cfg["BLOCK_D"]}
    fn = residual_norm._residual_norm_kernel
    specs.append(Spec("residual_norm", fn, _sig(fn, {
        "x_ptr": f, "delta_ptr": f, "w_ptr": f, "b_ptr": f, "y_ptr": f, "out_ptr": f,
        "alpha": "fp32", "eps": "fp32"}, ce), ce, cfg["num_warps"]))

    cfg = resample.candidates_config(shapes["codebook"])
    for keep_all in (False, True):
        ce = {"STREAM_CANDIDATE": rng_ref.STREAM_CANDIDATE,
              "STREAM_CONFIDENCE": rng_ref.STREAM_CONFIDENCE, "SAMPLE": True,
              "KEEP_ALL": keep_all, "HAS_NOISE": True,
              "BLOCK_F": cfg["BLOCK_F"], "BLOCK_C": cfg["BLOCK_C"]}
        fn = resample._candidates_kernel
        specs.append(Spec("resample_candidates" + ("_keep_all" if keep_all else ""), fn,
                          _sig(fn, {
                              "logits_ptr": f, "tokens_ptr": "*i64", "eligible_ptr": "*i1",
                              "seeds_ptr": "*i64", "out_ptr": "*i64", "cand_ptr": "*i32",
                              "key_ptr": "*i32", "level_ptr": "*i64",
                              "iteration_ptr": "*i64", "temperature_ptr": "*fp32",
                              "noise_ptr": "*fp32", "sample_ptr": "*i1"}, ce), ce,
                          cfg["num_warps"]))
    cfg = resample.select_config(T)
    ce = {"BLOCK_T": cfg["BLOCK_T"]}
    fn = resample._select_kernel
    specs.append(Spec("resample_select", fn, _sig(fn, {
        "cand_ptr": "*i32", "key_ptr": "*i32", "tokens_ptr": "*i64", "num_keep_ptr": "*i64",
        "out_ptr": "*i64"}, ce), ce, cfg["num_warps"]))
    return specs


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


def compile_spec(spec: Spec, arch: int) -> Dict[str, object]:
    """Compile one kernel for sm_`arch`; raises on any compiler error."""
    start = time.perf_counter()
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps,
                                       "num_stages": spec.num_stages})
    cubin = compiled.asm["cubin"]
    report = _ptxas_report(compiled.asm["ptx"], arch)
    return {"kernel": spec.name, "arch": f"sm_{arch}", "cubin_bytes": len(cubin),
            "shared_bytes": int(compiled.metadata.shared), "num_warps": spec.num_warps,
            "seconds": round(time.perf_counter() - start, 2), **report}


def compile_all(archs=(80, 90), dtypes=("bf16",)) -> List[Dict[str, object]]:
    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = []
    for dtype in dtypes:
        for spec in kernel_specs(dtype):
            for arch in archs:
                results.append({"dtype": dtype, **compile_spec(spec, arch)})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"],
                   choices=sorted(TRITON_DTYPES))
    p.add_argument("--json", action="store_true", help="print one JSON list as the last line")
    a = p.parse_args()
    results = compile_all(tuple(a.arch), tuple(a.dtype))
    print(f"{'kernel':<30} {'dtype':<5} {'arch':<6} {'regs':>5} {'spill B':>8} "
          f"{'smem B':>8} {'cubin B':>8} {'s':>6}")
    for r in results:
        print(f"{r['kernel']:<30} {r['dtype']:<5} {r['arch']:<6} {r['registers']:>5} "
              f"{r['spill_bytes']:>8} {r['shared_bytes']:>8} {r['cubin_bytes']:>8} "
              f"{r['seconds']:>6}")
    if a.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
