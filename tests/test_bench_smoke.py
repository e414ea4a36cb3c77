"""The decode benchmark runs end to end at the tiny preset (no timing is asserted)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_decode  # noqa: E402


def test_bench_decode_runs_at_the_tiny_preset():
    r = bench_decode.run("tiny", seconds=1.0, batch=2, dtype="float32", repeats=1, backend="auto")
    assert r["frames"] == 50 and r["forward_passes"] == 16 + 3
    for key in ("wall_s_median", "real_time_factor", "achieved_gflops", "matmul_gflops",
                "fraction_of_matmul"):
        assert r[key] > 0
