"""The GPU roofline prediction and the three-variant GPU benchmark, checked on this machine:
the prediction's totals are consistent, and the benchmark runs on a CPU at the tiny preset,
reporting what cannot run here as skipped instead of failing."""

import json
import os
import subprocess
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


def test_gpu_bench_runs_on_cpu_and_reports_what_it_skips(tmp_path):
    """The CPU run of the benchmark: without TRITON_INTERPRET the Triton variant is
    skipped with the reason; the eager and compiled variants are measured and compared."""
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), "--device", "cpu",
                        "--preset", "tiny", "--seconds", "1", "--batch", "1",
                        "--repeats", "2", "--dtype", "float32", "--compile-mode", "default",
                        "--quiet", "--json-out", str(out)],
                       capture_output=True, text=True, env=env, cwd=BENCH.parent, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    line = r.stdout.strip().splitlines()[-1]
    assert line == report["summary"] and line.startswith("tiny 1s float32 cpu | b1: ")
    assert report["settings"]["forward_passes"] == 19 and report["settings"]["batches"] == [1]

    triton = report["variants"]["triton-graphs"]["batches"]
    assert set(triton) == {"1"}
    assert all("TRITON_INTERPRET" in cell["skipped"] for cell in triton.values())
    eager = report["variants"]["torch-eager"]
    assert eager["cuda_graphs"] is False and eager["backend"] == "torch"
    assert eager["warmup"]["graphs"] == 0 and eager["warmup"]["pool_bytes_estimate"] > 0
    for b, cell in eager["batches"].items():
        assert cell["skipped"] is None and cell["rounds"] == 2
        assert 0 < cell["wall_s_min"] <= cell["wall_s"] <= cell["wall_s_max"]
        assert cell["audio_s_per_s"] == pytest.approx(int(b) * 1.0 / cell["wall_s"])
    compiled = report["variants"]["torch-compile"]["batches"]
    for cell in compiled.values():
        if cell["skipped"]:                  # no working C++ compiler: a reason, not a crash
            assert "torch-compile" in line and cell["skipped"] in line
            continue
        assert cell["speedup_vs_eager"] > 0
        assert 0.0 <= cell["greedy_agreement_vs_eager"] <= 1.0


def test_gpu_bench_rejects_bad_settings(capsys):
    import gpu_bench
    for argv, message in ((["--seconds", "0"], "seconds must be > 0"),
                          (["--preset", "tiny", "--seconds", "20"], "max_frames=256"),
                          (["--dtype", "int8"], "dtype must be one of"),
                          (["--batch", "0"], "batch sizes must be ints >= 1")):
        with pytest.raises(SystemExit):
            gpu_bench.main(argv + ["--device", "cpu", "--quiet"])
        assert message in capsys.readouterr().err
