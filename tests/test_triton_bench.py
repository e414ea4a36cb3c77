"""The per-op benchmark runs (on CPU through the interpreter: no timing is asserted) and
the analytic traffic table agrees with the numbers quoted in the kernels' docstrings."""

import _triton_setup  # noqa: F401  (must come first: picks interpreter or GPU)
from _triton_setup import DEVICE

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_ops  # noqa: E402
import op_costs  # noqa: E402

from soundstorm.engine import ModelConfig  # noqa: E402


def test_bench_ops_runs_every_op_at_the_tiny_preset():
    rows = bench_ops.run("tiny", seconds=0.4, batch=2, dtype="float32", repeats=1, inner=1,
                         device=str(DEVICE))
    assert [r["op"] for r in rows] == ["summed_embedding", "rotary_attention", "conv_module",
                                       "masked_resample", "residual_norm"]
    for r in rows:
        assert r["frames"] == 20 and r["reference_ms"] > 0 and r["triton_ms"] > 0
        assert r["speedup"] > 0 and r["triton_GBps"] > 0


def _mb(x: float) -> tuple:
    return (f"{x / 1e6:.1f} MB", f"{x / 1e6:.0f} MB")


def test_kernel_docstrings_quote_the_analytic_table():
    costs = {c.name: c for c in op_costs.op_costs(ModelConfig.preset("paper"), 1500)}
    modules = {"summed_embedding": "embedding", "rotary_attention": "attention",
               "conv_module": "conv_module", "masked_resample": "resample",
               "residual_norm": "residual_norm"}
    for op, module in modules.items():
        doc = importlib.import_module(f"soundstorm.kernels.triton.{module}").__doc__
        c = costs[op]
        assert c.fused_bytes < c.reference_bytes
        for value in (c.fused_bytes, c.reference_bytes, c.saved_bytes):
            assert any(s in doc for s in _mb(value)), (op, value / 1e6)
