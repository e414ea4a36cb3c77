"""GPU acceptance check: one command for the first machine with a CUDA GPU.

    make gpu-check                        # = python bench/gpu_check.py
    python bench/gpu_check.py --out gpu-check.json --budget 480 [--skip-bench | --compile]

Runs with the Python that is already there (a CUDA build of torch, maybe no network):

1. installs this checkout into that Python without pulling any dependency
   (`pip install --no-deps --no-build-isolation -e .`), and says which of the packages
   the checks use are missing;
2. runs, within the time budget (8 minutes by default), each check that this machine can
   run and says plainly which it could not:
   - `kernels`: the Triton kernel tests, compiled on the GPU (`tests/test_triton_*.py`);
   - `capture`: the capture-safety tests, on CPU tensors, on the meta device and on real
     CUDA tensors (`tests/test_capture_safety.py`, `tests/test_gpu.py -k capture`);
   - `graphs`: CUDA-graph decoding equal to eager decoding token for token on ragged,
     prompted batches, greedy and sampled, lockstep and scheduled; warm-up into one pool
     (`tests/test_gpu.py`);
   - `two-gpus`: two engines on two GPUs from two threads (part of `tests/test_gpu.py`,
     needs two GPUs);
   - `bench`: `bench/gpu_bench.py` (paper preset, 30 s, batch 1 and 8, bf16: Triton with
     graphs vs torch eager, alternating in one run; `--compile` adds torch.compile, whose
     max-autotune warm-up alone takes minutes at the paper preset);
3. writes everything to one JSON file and prints a one-line summary. Exit status 0 when
   nothing that ran failed (checks that could not run are listed, not failed).

Without a GPU (as in the project's CI) the CPU parts run - install, the capture-safety
tests on CPU and meta tensors - and every GPU part is reported as not checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the checks import besides torch: the package's own dependencies and the test tools.
PACKAGES = {"numpy": "numpy", "safetensors": "safetensors", "tqdm": "tqdm",
            "yaml": "pyyaml", "matplotlib": "matplotlib", "soundfile": "soundfile",
            "soxr": "soxr", "pytest": "pytest", "triton": "triton"}


def missing_packages() -> list:
    return sorted(name for module, name in PACKAGES.items()
                  if importlib.util.find_spec(module) is None)


def install(python: str, timeout: float) -> dict:
    """This checkout into `python`, editable, without touching its dependencies."""
    if _installed_here(python):
        return {"status": "passed", "detail": "already installed from this checkout"}
    cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
           str(ROOT)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "detail": f"pip install timed out after {timeout:.0f} s"}
    if r.returncode != 0 or not _installed_here(python):
        return {"status": "failed", "detail": (r.stderr or r.stdout)[-2000:]}
    return {"status": "passed", "detail": " ".join(cmd)}


def _installed_here(python: str) -> bool:
    code = "import soundstorm.engine, pathlib; print(pathlib.Path(soundstorm.engine.__file__).resolve())"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/")
    return r.returncode == 0 and Path(r.stdout.strip()).is_relative_to(ROOT)


def pytest_check(python: str, args: list, timeout: float, env: dict) -> dict:
    """Run pytest on `args`; passed when nothing failed and something ran."""
    # -P: the checkout is not put on sys.path (its kernels/ would shadow a package of that name)
    cmd = [python, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"status": "failed", "detail": f"timed out after {timeout:.0f} s",
                "output": out[-3000:], "seconds": round(time.perf_counter() - start, 1)}
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)",
                                               r.stdout)}
    ran = counts.get("passed", 0) + counts.get("failed", 0)
    failed = r.returncode not in (0, 5) or counts.get("failed", 0) or counts.get("error", 0) \
        or counts.get("errors", 0)
    status = "failed" if failed else ("passed" if ran else "not checked")
    skipped = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.+)", r.stdout)))
    return {"status": status, "counts": counts, "seconds": round(time.perf_counter() - start, 1),
            "skipped_because": skipped, "command": " ".join(cmd),
            "output": r.stdout[-3000:] + r.stderr[-2000:] if failed else r.stdout[-600:]}


def bench_check(python: str, timeout: float, env: dict, out: Path,
                compile_too: bool = False) -> dict:
    variants = ["triton-graphs", "torch-eager"] + (["torch-compile"] if compile_too else [])
    cmd = [python, str(ROOT / "bench" / "gpu_bench.py"), "--preset", "paper", "--seconds", "30",
           "--batch", "1", "8", "--dtype", "bfloat16", "--device", "cuda", "--repeats", "3",
           "--variants", *variants, "--json-out", str(out)]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "detail": f"timed out after {timeout:.0f} s", "command": " ".join(cmd)}
    result = {"status": "passed" if r.returncode == 0 else "failed", "command": " ".join(cmd),
              "seconds": round(time.perf_counter() - start, 1),
              "summary": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "",
              "output": (r.stdout + r.stderr)[-3000:]}
    if out.exists():
        result["results"] = json.loads(out.read_text())
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check.json", help="JSON report (default: %(default)s)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for all checks together (default: %(default)s)")
    p.add_argument("--skip-bench", action="store_true", help="leave out the benchmark")
    p.add_argument("--compile", action="store_true",
                   help="benchmark torch.compile too (its warm-up takes minutes: give a budget "
                        "of 15 minutes or more)")
    p.add_argument("--python", default=sys.executable, help="the Python to check (default: this one)")
    args = p.parse_args(argv)
    if not args.budget > 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")

    deadline = time.perf_counter() + args.budget
    left = lambda: max(1.0, deadline - time.perf_counter())  # noqa: E731
    import torch

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    report = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                          "cuda": torch.version.cuda, "gpus": [torch.cuda.get_device_name(i)
                                                               for i in range(gpus)]},
              "missing_packages": missing_packages(), "checks": {}, "not_checked": {}}
    checks, not_checked = report["checks"], report["not_checked"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    checks["install"] = install(args.python, min(120.0, left()))
    if checks["install"]["status"] != "passed":
        return _finish(report, args.out)
    if "pytest" in report["missing_packages"]:
        not_checked["tests"] = "pytest is not installed (pip install pytest)"
        return _finish(report, args.out)
    if not cuda:
        reason = "no CUDA GPU on this machine (or torch is a CPU build)"
        for name in ("kernels", "graphs", "two-gpus", "bench"):
            not_checked[name] = reason
        checks["capture"] = pytest_check(args.python, ["tests/test_capture_safety.py"],
                                         min(400.0, left()), env)
        not_checked["capture on CUDA tensors"] = reason
        return _finish(report, args.out)

    if "triton" in report["missing_packages"]:
        not_checked["kernels"] = "triton is not installed (pip install triton==3.7.1)"
    else:
        checks["kernels"] = pytest_check(args.python, ["tests/test_triton_ops.py",
                                                       "tests/test_triton_resample.py",
                                                       "tests/test_triton_model.py"],
                                         min(150.0, left() * 0.35), env)
    checks["capture"] = pytest_check(args.python, ["tests/test_capture_safety.py",
                                                   "tests/test_gpu.py", "-k", "capture"],
                                     min(120.0, left() * 0.35), env)
    checks["graphs"] = pytest_check(args.python, ["tests/test_gpu.py", "-k", "not capture"],
                                    min(150.0, left() * 0.5), env)
    if gpus < 2:
        not_checked["two-gpus"] = f"{gpus} GPU on this machine; the test needs two"
    if args.skip_bench:
        not_checked["bench"] = "--skip-bench"
    else:
        checks["bench"] = bench_check(args.python, left(), env,
                                      Path(args.out).with_suffix(".bench.json"), args.compile)
    return _finish(report, args.out)


def _finish(report: dict, out: str) -> int:
    checks, not_checked = report["checks"], report["not_checked"]
    failed = sorted(k for k, v in checks.items() if v["status"] == "failed")
    passed = sorted(k for k, v in checks.items() if v["status"] == "passed")
    for k, v in checks.items():
        if v["status"] == "not checked":
            not_checked.setdefault(k, "; ".join(v.get("skipped_because", [])) or "nothing ran")
    report["passed"], report["failed"] = passed, failed
    Path(out).write_text(json.dumps(report, indent=2, default=str))
    bench = checks.get("bench", {}).get("summary", "")
    missing = report["missing_packages"]
    line = (f"gpu-check: {'FAIL' if failed else 'PASS'} - passed: {', '.join(passed) or 'none'}"
            + (f"; failed: {', '.join(failed)}" if failed else "")
            + (f"; not checked: {_grouped(not_checked)}" if not_checked else "")
            + (f"; missing packages: {', '.join(missing)}" if missing else "")
            + (f"; bench: {bench}" if bench else "") + f"; report: {out}")
    print(line)
    return 1 if failed else 0


def _grouped(reasons: dict) -> str:
    """{check: reason} as 'a, b (reason); c (other reason)'."""
    by_reason = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())


if __name__ == "__main__":
    sys.exit(main())
