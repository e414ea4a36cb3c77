"""Setuptools entry point. Metadata lives in pyproject.toml; this file declares the optional
C++ extension soundstorm.kernels._C (csrc/*.cpp), the kernels of backend "cpp".

The extension is optional: without a C++ compiler (or without pybind11, which the build
requires) the package installs without it, and backend "cpp" then says why it cannot run.
Flags are portable (no -march=native); the kernels pick AVX-512 variants at run time.
"""

import glob
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def extensions():
    try:
        import pybind11
    except ImportError:
        print("note: pybind11 is not installed; building without soundstorm.kernels._C", file=sys.stderr)
        return []
    from setuptools import Extension

    if sys.platform == "win32":
        compile_args, link_args = ["/O2", "/openmp", "/std:c++17"], []
    else:
        # -ffp-contract=off: no fused multiply-add, so float32 arithmetic rounds step by
        # step exactly as the PyTorch references do.
        compile_args = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off",
                        "-fvisibility=hidden"]
        link_args = ["-fopenmp"]
    return [Extension(
        "soundstorm.kernels._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        depends=sorted(glob.glob("csrc/*.h")),
        include_dirs=[pybind11.get_include(), "csrc"],
        language="c++",
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        optional=True,
    )]


class BuildExt(build_ext):
    """build_ext that reports a skipped optional extension plainly."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # a missing compiler can surface outside the per-ext guard
            print(f"note: building soundstorm.kernels._C failed ({e}); backend 'cpp' will be "
                  f"unavailable", file=sys.stderr)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
