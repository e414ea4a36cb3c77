"""`bench/bench_xla.py` runs at the tiny preset and reports what it promises (no timing is
asserted), and its TPU-v4 prediction is the sum of its per-op table."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_xla  # noqa: E402


def test_bench_xla_runs_at_the_tiny_preset(capsys):
    assert bench_xla.main(["--preset", "tiny", "--seconds", "0.6", "--repeats", "1",
                           "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = report["measured"]
    assert m["frames"] == 30 and m["forward_passes"] == 16 + 3
    for key in ("compile_s", "torch_s", "xla_s", "speedup_xla_over_torch"):
        assert m[key] > 0
    assert m["token_agreement"] == 1.0          # random tiny weights: the logits agree


def test_tpu_prediction_adds_up_and_bfloat16_reads_fewer_bytes():
    bf16, fp32 = bench_xla.predict_tpu(act_bytes=2), bench_xla.predict_tpu(act_bytes=4)
    assert bf16["forward_passes"] == 27 and bf16["frames"] == 1500
    assert bf16["ms_per_decode"] == pytest.approx(sum(r["ms_per_decode"] for r in bf16["ops"]))
    assert fp32["bandwidth_limit_ms"] == pytest.approx(2 * bf16["bandwidth_limit_ms"], rel=0.05)
    assert fp32["compute_limit_ms"] == pytest.approx(bf16["compute_limit_ms"])
    assert bf16["roofline_limit_ms"] <= bf16["ms_per_decode"]
    # the scores of XLA's own attention: 2 x 16 heads x 1500^2 x 4 bytes x 12 layers a pass
    assert bf16["xla_attention_extra_ms"] == pytest.approx(
        27 * 2 * 16 * 1500 ** 2 * 4 * 12 / (1.2e12 * 0.8) * 1e3)
