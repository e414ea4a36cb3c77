"""`pip install .` (not only the editable install) gives the `soundstorm.*` namespace and
nothing at top level."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_the_top_level_folders_into_soundstorm(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("soundstorm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("soundstorm/engine/model.py", "soundstorm/cli/__init__.py",
                   "soundstorm/kernels/resample.py", "soundstorm/kernels/triton/attention.py",
                   "soundstorm/training/__init__.py", "soundstorm/engine/codecs/melrvq.py",
                   "soundstorm/training/codec_fit.py", "soundstorm/training/semantic.py",
                   "soundstorm/demo/run.py",
                   # the shipped demo assets travel as package data
                   "soundstorm/demo/demo.json", "soundstorm/demo/model/config.json",
                   "soundstorm/demo/model/model.safetensors",
                   "soundstorm/demo/codec/codebooks.safetensors",
                   "soundstorm/demo/codec/vocoder.safetensors", "soundstorm/demo/wer.py",
                   "soundstorm/demo/semantic/semantic.json",
                   "soundstorm/demo/text-model/model.safetensors",
                   "soundstorm/demo/text-model/config.json",
                   "soundstorm/demo/text-train.args", "soundstorm/demo/train.yaml",
                   "soundstorm/demo/lookup.yaml", "soundstorm/engine/text_model.py",
                   "soundstorm/engine/tts.py", "soundstorm/cli/speech.py"):
        assert module in names
    if shutil.which("c++") or shutil.which("g++"):
        # with a compiler the C++ kernels of backend "cpp" travel in the wheel
        assert any(n.startswith("soundstorm/kernels/_C") and n.endswith(".so") for n in names)
    top = {n.split("/")[0] for n in names}
    assert top <= {"soundstorm"} | {n for n in top if n.startswith("soundstorm-")}, top
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "soundstorm = soundstorm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # a regular (non-editable) install of it imports and runs from outside the source tree
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    code = ("import soundstorm.engine as e, soundstorm.kernels, soundstorm.training;"
            "from soundstorm.demo import ASSETS;"
            "assert str(e.__file__).startswith(%r) and (ASSETS / 'model').is_dir();"
            "print(e.ModelConfig.preset('tiny').dim)" % str(target))
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "64", r.stderr


def test_wheel_builds_without_a_compiler(tmp_path):
    """The C++ extension is optional: with no compiler the wheel is built without it, and
    the package imports and runs on the reference ops."""
    # a clean copy of the source: no extension built in place by an editable install
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", ".benchmarks"))
    missing = str(tmp_path / "no-such-compiler")
    env = {**os.environ, "CC": missing, "CXX": missing, "LDSHARED": missing + " -shared"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("soundstorm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "soundstorm/kernels/cpp.py" in names
    assert not any(n.startswith("soundstorm/kernels/_C") for n in names)
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    # -S: no .pth files, so the editable install of this checkout (which has the extension)
    # is not found; the wheel's files and the installed dependencies are.
    import site

    # The installed packages go after the standard library, as site would put them.
    code = ("import sys; sys.path.insert(0, %r); sys.path.extend(%r)\n"
            "import soundstorm.kernels as k; from soundstorm.kernels import get_ops\n"
            "assert k.__file__.startswith(%r), k.__file__\n"
            "print(get_ops('auto').name)\n"
            "try:\n    get_ops('cpp')\nexcept RuntimeError as e:\n    print(e)"
            % (str(target), site.getsitepackages(), str(target)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    auto, error = r.stdout.strip().split("\n", 1)
    assert auto == "torch"
    assert "backend 'cpp' is not available: the C++ extension soundstorm.kernels._C does not " \
           "import" in error
