"""The GPU roofline prediction, checked on this machine: its totals are consistent."""

import json
import sys
from pathlib import Path

import pytest

from soundstorm.engine import DecodeConfig, ModelConfig
from soundstorm.engine.flops import forward_flops

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_prediction  # noqa: E402


@pytest.mark.parametrize("preset,seconds", [("tiny", 1.0), ("tiny", 5.0), ("paper", 30.0)])
@pytest.mark.parametrize("gpu", sorted(gpu_prediction.GPUS))
@pytest.mark.parametrize("graphs,fused", [(True, True), (False, False)])
def test_prediction_totals_are_consistent(preset, seconds, gpu, graphs, fused):
    cfg = ModelConfig.preset(preset)
    assumptions = gpu_prediction.Assumptions(cuda_graphs=graphs)
    one, eight = (gpu_prediction.predict(cfg, seconds, b, gpu_prediction.GPUS[gpu],
                                         assumptions, fused) for b in (1, 8))
    passes = DecodeConfig().num_forward_passes(cfg.num_quantizers)
    for p in (one, eight):
        assert p["forward_passes"] == passes and p["sampled_passes"] == 15
        assert all(r["ms_per_decode"] > 0 for r in p["ops"])
        assert sum(r["ms_per_decode"] for r in p["ops"]) == pytest.approx(p["ms_per_decode"])
        assert p["ms_per_pass"] * passes == pytest.approx(p["ms_per_decode"])
        assert p["real_time_factor"] * p["audio_s_per_s"] == pytest.approx(1.0)
        # Nothing runs faster than its roofline, nor that than pure compute or pure traffic.
        assert p["ms_per_decode"] > p["roofline_limit_ms"]
        limit = max(p["compute_limit_ms"], p["bandwidth_limit_ms"])
        assert limit > 0 and p["roofline_limit_ms"] >= limit * (1 - 1e-9)
        # The tensor-core FLOPs are exactly the analytic count of every matrix product.
        expected = passes * forward_flops(cfg, p["batch"], p["bucket_frames"])
        assert p["tensor_tflop_per_decode"] * 1e12 == pytest.approx(expected)
    assert eight["ms_per_decode"] >= one["ms_per_decode"]
    assert eight["audio_s_per_s"] >= one["audio_s_per_s"]


def test_prediction_follows_its_assumptions():
    cfg, h100 = ModelConfig.preset("paper"), gpu_prediction.GPUS["h100"]
    base = gpu_prediction.predict(cfg, 30, 1, h100)
    # Compute limit: the matrix products of 27 passes at 989 TFLOP/s.
    assert base["compute_limit_ms"] == pytest.approx(
        27 * forward_flops(cfg, 1, 1500) / 989.4e12 * 1e3)
    slower = gpu_prediction.predict(cfg, 30, 1, h100,
                                    gpu_prediction.Assumptions(matmul_fraction=0.35))
    assert slower["ms_per_decode"] > base["ms_per_decode"]
    h200 = gpu_prediction.predict(cfg, 30, 1, gpu_prediction.GPUS["h200"])
    assert h200["ms_per_decode"] < base["ms_per_decode"]          # more bandwidth, same compute
    eager = gpu_prediction.predict(cfg, 30, 1, h100, gpu_prediction.Assumptions(cuda_graphs=False),
                                   fused=False)
    assert eager["ms_per_decode"] > base["ms_per_decode"]
    # The tiny preset's 1 s (50 frames) runs in the 64-frame bucket.
    assert gpu_prediction.predict(ModelConfig.preset("tiny"), 1, 1, h100)["bucket_frames"] == 64
    with pytest.raises(ValueError, match="max_frames"):
        gpu_prediction.predict(cfg, 31, 1, h100)
    with pytest.raises(ValueError, match="matmul_fraction"):
        gpu_prediction.Assumptions(matmul_fraction=1.5)


def test_prediction_command_prints_the_table(capsys):
    assert gpu_prediction.main(["--preset", "tiny", "--seconds", "1", "--ops", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert len(result["predictions"]) == 4                   # H100, H200 x batch 1, 8
    assert any(line.startswith("masked_resample") for line in out)

