"""`make gpu-check` on a machine without a GPU: it installs nothing new (this checkout is
already installed), runs the CPU parts, passes them, and names every GPU part it could not
check; its report is complete JSON."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_its_cpu_parts_and_names_what_it_could_not_check(tmp_path):
    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out),
                        "--skip-bench"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("gpu-check: PASS")
    report = json.loads(out.read_text())
    assert report["checks"]["install"]["status"] == "passed"
    assert report["checks"]["capture"]["status"] == "passed"
    assert report["checks"]["capture"]["counts"]["passed"] >= 7
    if not torch.cuda.is_available():
        assert {"kernels", "graphs", "two-gpus", "bench"} <= set(report["not_checked"])
        assert "no CUDA GPU" in line and "graphs" in line


def test_gpu_check_refuses_a_bad_budget():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--budget", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--budget must be > 0 seconds, got 0.0" in r.stderr
