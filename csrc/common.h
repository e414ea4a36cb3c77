// What the row-wise kernels (norm.cpp, quant.cpp, rotary.cpp) share: the array type they
// take, how they fail, and how a loop is compiled for several instruction sets.
#pragma once

#include <stdexcept>
#include <string>

#include <pybind11/numpy.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace soundstorm {

// A C-contiguous numpy array of T (a zero-copy view of a CPU tensor).
template <typename T>
using Array = pybind11::array_t<T, pybind11::array::c_style>;

// Bad arguments raise ValueError in Python, naming the op.
[[noreturn]] inline void fail(const char* op, const std::string& message) {
    throw std::invalid_argument(std::string(op) + ": " + message);
}

}  // namespace soundstorm

// The per-row work is compiled for AVX-512, AVX2 and the portable baseline, and the loader
// picks the best the CPU has (GCC's target_clones); the flags stay portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SOUNDSTORM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SOUNDSTORM_CLONES
#endif
