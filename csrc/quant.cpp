// Per-row int8 quantisation of activations and the float32 rescaling of int32 products: the
// two passes around torch._int_mm in backend "cpp"'s int8 linear layers, counterparts of
// quantize_rows_reference and dequantize_reference in soundstorm/kernels/int8_linear.py.
//
// quantize_rows: per row of K values, amax = max |x| (at least 1e-30), inv = 127 / amax,
//   q = round_half_even(x * inv) clamped to [-127, 127], scale = amax / 127.
// dequantize: y[m, n] = float(acc[m, n]) * (x_scale[m] * w_scale[n]) + bias[n].
//
// Both equal the references bit for bit: the same float32 operations in the same order
// (no fused multiply-add: setup.py builds with -ffp-contract=off), and nearbyint rounds
// half to even in the default rounding mode, as torch.round does. Rows are independent:
// parallel over rows with OpenMP.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"

namespace py = pybind11;

namespace soundstorm {
namespace {

constexpr float kQmax = 127.0f;
constexpr float kMinAmax = 1e-30f;

// The portable quantisation of one row; x * inv is rounded half to even by nearbyint.
void quantize_row_baseline(const float* x, int64_t K, int8_t* q, float* scale) {
    float amax = 0.0f;
    #pragma omp simd reduction(max : amax)
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
    // NaN compares false: a row with a NaN keeps the largest of its other values, as
    // torch.amax does not; such rows give garbage either way.
    if (!(amax >= kMinAmax)) amax = kMinAmax;
    const float inv = kQmax / amax;
    for (int64_t k = 0; k < K; ++k) {
        float v = std::nearbyint(x[k] * inv);
        v = std::min(std::max(v, -kQmax), kQmax);
        q[k] = static_cast<int8_t>(v);
    }
    *scale = amax / kQmax;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same with AVX-512: 16 lanes per step (the compiler does not vectorise nearbyint),
// the tail in the baseline's scalar steps. roundscale with imm 0 rounds half to even.
__attribute__((target("avx512f")))
void quantize_row_avx512(const float* x, int64_t K, int8_t* q, float* scale) {
    __m512 vmax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    float amax = _mm512_reduce_max_ps(vmax);
    for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
    if (!(amax >= kMinAmax)) amax = kMinAmax;
    const float inv = kQmax / amax;
    const __m512 vinv = _mm512_set1_ps(inv), hi = _mm512_set1_ps(kQmax),
                 lo = _mm512_set1_ps(-kQmax);
    for (k = 0; k + 16 <= K; k += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + k), vinv);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    for (; k < K; ++k) {
        float v = std::nearbyint(x[k] * inv);
        v = std::min(std::max(v, -kQmax), kQmax);
        q[k] = static_cast<int8_t>(v);
    }
    *scale = amax / kQmax;
}
#endif

using QuantizeRow = void (*)(const float*, int64_t, int8_t*, float*);

QuantizeRow pick_quantize_row() {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return quantize_row_avx512;
#endif
    return quantize_row_baseline;
}

QuantizeRow quantize_row = pick_quantize_row();

template <typename A>
inline void dequantize_row_body(const A* acc, float xs, const float* ws, const float* bias,
                                int64_t N, float* y) {
    if (bias) {
        #pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
            const float s = xs * ws[n];
            const float v = static_cast<float>(acc[n]) * s;
            y[n] = v + bias[n];
        }
    } else {
        #pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
            const float s = xs * ws[n];
            y[n] = static_cast<float>(acc[n]) * s;
        }
    }
}

// x float32 [M, K] -> q int8 [M, K], scale float32 [M] (written into the given arrays).
void quantize_rows(Array<float> x, Array<int8_t> q_out, Array<float> scale_out) {
    const char* op = "quantize_rows";
    if (x.ndim() != 2) fail(op, "x must be [M, K]");
    const int64_t M = x.shape(0), K = x.shape(1);
    if (q_out.ndim() != 2 || q_out.shape(0) != M || q_out.shape(1) != K)
        fail(op, "q_out must have the shape of x");
    if (scale_out.ndim() != 1 || scale_out.shape(0) != M)
        fail(op, "scale_out must be [M] with M = " + std::to_string(M));
    const float* xs = x.data();
    int8_t* qs = q_out.mutable_data();
    float* ss = scale_out.mutable_data();
    py::gil_scoped_release release;
    #pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_row(xs + m * K, K, qs + m * K, ss + m);
}

SOUNDSTORM_CLONES
void dequantize_row(const int32_t* acc, float xs, const float* ws, const float* bias, int64_t N,
                    float* y) {
    dequantize_row_body(acc, xs, ws, bias, N, y);
}

// The same from sums already converted to float32 (oneDNN's output with unit scales: the
// conversion rounds as float(acc) does, so the result is the same).
SOUNDSTORM_CLONES
void dequantize_row(const float* acc, float xs, const float* ws, const float* bias, int64_t N,
                    float* y) {
    dequantize_row_body(acc, xs, ws, bias, N, y);
}

// acc int32 (or float32 holding int32 sums) [M, N], x_scale [M], w_scale [N], bias [N] or
// None -> out float32 [M, N] (out may be acc itself when acc is float32).
template <typename A>
void dequantize(Array<A> acc, Array<float> x_scale, Array<float> w_scale,
                std::optional<Array<float>> bias, Array<float> out) {
    const char* op = "dequantize";
    if (acc.ndim() != 2) fail(op, "acc must be [M, N]");
    const int64_t M = acc.shape(0), N = acc.shape(1);
    if (x_scale.ndim() != 1 || x_scale.shape(0) != M)
        fail(op, "x_scale must be [M] with M = " + std::to_string(M));
    if (w_scale.ndim() != 1 || w_scale.shape(0) != N)
        fail(op, "w_scale must be [N] with N = " + std::to_string(N));
    if (bias && (bias->ndim() != 1 || bias->shape(0) != N))
        fail(op, "bias must be [N] with N = " + std::to_string(N));
    if (out.ndim() != 2 || out.shape(0) != M || out.shape(1) != N)
        fail(op, "out must be [M, N]");
    const A* as = acc.data();
    const float* xs = x_scale.data();
    const float* ws = w_scale.data();
    const float* bs = bias ? bias->data() : nullptr;
    float* ys = out.mutable_data();
    py::gil_scoped_release release;
    #pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; ++m) dequantize_row(as + m * N, xs[m], ws, bs, N, ys + m * N);
}

}  // namespace
}  // namespace soundstorm

void register_quant(py::module_& m) {
    m.def("use_avx512_quantize", [](bool on) {
        soundstorm::quantize_row = on ? soundstorm::pick_quantize_row()
                                      : soundstorm::quantize_row_baseline;
        return soundstorm::quantize_row != soundstorm::quantize_row_baseline;
    }, "quantize_rows with the AVX-512 row kernel (where the CPU has it: returns whether it "
       "is used) or the portable one", py::arg("on"));
    m.def("quantize_rows", &soundstorm::quantize_rows,
          "per-row symmetric int8 codes and scales of x, written into q_out and scale_out "
          "(see soundstorm.kernels.int8_linear)",
          py::arg("x"), py::arg("q_out"), py::arg("scale_out"));
    const char* doc = "float(acc) * (x_scale[m] * w_scale[n]) + bias[n], written into out";
    m.def("dequantize", &soundstorm::dequantize<int32_t>, doc, py::arg("acc"),
          py::arg("x_scale"), py::arg("w_scale"), py::arg("bias"), py::arg("out"));
    m.def("dequantize", &soundstorm::dequantize<float>, doc, py::arg("acc"),
          py::arg("x_scale"), py::arg("w_scale"), py::arg("bias"), py::arg("out"));
}
