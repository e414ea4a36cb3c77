"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90 (H100) at the
`paper` preset's shapes, in bf16, without spilling registers or overflowing shared
memory, both as the launchers launch it (with the JIT's specialisations: 16-byte aligned
pointers and integers divisible by 16 marked `tt.divisibility = 16`, integers equal to 1
made constants) and with no specialisation; and AOTAutograd (what torch.compile runs)
sees the kernels inside every op.

Compiled kernels cannot coexist with the interpreted ones the other Triton tests use in
this process, so this runs in a subprocess without TRITON_INTERPRET."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Not imported here: this process runs the interpreted kernels (see conftest.py).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

SCRIPT = """
import json
from soundstorm.kernels.triton.aot import compile_all
from soundstorm.kernels.triton.trace import traced_kernels
print(json.dumps({"compiled": compile_all(archs=(80, 90), dtypes=("bf16",)),
                  "traced": traced_kernels()}))
"""

KERNELS = {"summed_embedding", "rotary_attention", "conv_module", "residual_norm",
           "resample_candidates", "resample_candidates_keep_all", "resample_select"}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}   # opt-in shared memory per block


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache: every kernel is really compiled here, not found from an earlier run.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_paper_preset_matches_the_compiled_shapes():
    from soundstorm.engine import ModelConfig
    from soundstorm.kernels.triton.aot import PAPER_SHAPES

    cfg = ModelConfig.preset("paper")
    assert PAPER_SHAPES == dict(
        frames=cfg.max_frames, dim=cfg.dim, heads=cfg.heads, head_dim=cfg.head_dim,
        conv_dim=cfg.conv_dim, conv_kernel=cfg.conv_kernel, levels=cfg.num_quantizers,
        codebook=cfg.codebook_size, semantic_vocab=cfg.semantic_vocab_size,
        semantic_index_fraction=cfg.semantic_index_fraction(), batch=1)


def rows_of(report, arch, variant):
    return {r["kernel"]: r for r in report["compiled"]
            if r["arch"] == arch and r["variant"] == variant}


@pytest.mark.parametrize("variant", ["launch", "plain"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_for_the_target(report, arch, variant):
    rows = rows_of(report, arch, variant)
    assert set(rows) == KERNELS
    for name, r in rows.items():
        assert r["cubin_bytes"] > 0, name
        assert r["spill_bytes"] == 0, (name, r)
        assert 0 < r["registers"] <= 255, (name, r)
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], (name, r)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_the_launch_variant_carries_the_jit_specialisations(report, arch):
    """What the JIT decides for the launchers' real arguments reaches the compiled IR:
    every pointer (all 16-byte aligned at these shapes) and every integer divisible by 16
    carries tt.divisibility = 16 in the TTIR, and unit strides are constants."""
    for name, r in rows_of(report, arch, "launch").items():
        assert r["ttir_divisible_args"] == r["divisible_args"], name
        assert set(r["pointer_args"]) <= set(r["ttir_divisible_args"]), name
    attention = rows_of(report, arch, "launch")["rotary_attention"]
    # 16 heads and the fused projection's 3 * 16 * 64 frame stride divide; 1500 frames not
    assert {"H", "stride_qt", "stride_kt", "stride_vt"} <= set(attention["divisible_args"])
    assert "T" not in attention["divisible_args"]
    embedding = rows_of(report, arch, "launch")["summed_embedding"]
    assert {"rate_num", "stride_ss", "stride_tq"} <= set(embedding["constant_args"])
    assert "stride_wk" in rows_of(report, arch, "launch")["conv_module"]["constant_args"]
    for name, r in rows_of(report, arch, "plain").items():
        assert r["ttir_divisible_args"] == [] and r["constant_args"] == [], name


def test_tracing_sees_the_triton_kernels_of_every_op(report):
    assert report["traced"] == {
        "summed_embedding": ["_summed_embedding_kernel"],
        "rotary_attention": ["_rotary_attention_kernel"],
        "conv_module": ["_conv_module_kernel"],
        "masked_resample": ["_candidates_kernel", "_select_kernel"],
        "residual_norm": ["_residual_norm_kernel"],
    }


def test_kernels_use_plain_pointer_arithmetic():
    """The kernels index with explicit offsets and masks, never with tl.make_block_ptr."""
    from pathlib import Path

    sources = Path(__file__).resolve().parents[1].joinpath("kernels", "triton").glob("*.py")
    for path in sources:
        assert "make_block_ptr" not in path.read_text(), path.name
