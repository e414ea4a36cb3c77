// Row-wise fused ops built around LayerNorm, on the CPU: the counterparts of
// soundstorm.kernels.residual_norm.residual_norm_reference and
// soundstorm.kernels.conv_module.conv_module_reference.
//
// residual_norm: per row of D values, y = x + alpha * delta, then LayerNorm(y); one pass
//   over the row writes y, a second (in cache) takes its moments, a third normalises.
// conv_module: per batch row, GLU over the last dim with padded frames zeroed, then per
//   frame the depthwise convolution (K centred taps, zeros beyond the ends), LayerNorm over
//   the channels and swish.
//
// LayerNorm's mean and variance are accumulated in double (two passes: the mean, then the
// squared deviations) and the output is rounded once to the storage type, so results agree
// with the references to within a few float32 ulp, not bit for bit (the references
// accumulate in float32 in another order). Rows (frames) are independent: parallel over
// rows with OpenMP.

#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional arguments (None)

#include "common.h"

namespace py = pybind11;

namespace soundstorm {
namespace {

#define SOUNDSTORM_INLINE inline __attribute__((always_inline))

// 1 / (1 + exp(-x)), as torch.sigmoid and the swish of F.silu compute it.
SOUNDSTORM_INLINE float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Mean and 1 / sqrt(variance + eps) of the D values of `row` (biased variance, as
// LayerNorm), both in double.
template <typename F>
SOUNDSTORM_INLINE void row_moments(const F* row, int64_t D, double eps, double& mean, double& rstd) {
    // `omp simd reduction` lets the compiler vectorise the sums without -ffast-math (the
    // lanes' partial sums are added at the end).
    double sum = 0.0;
    #pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; ++d) sum += double(row[d]);
    mean = sum / double(D);
    double sq = 0.0;
    #pragma omp simd reduction(+ : sq)
    for (int64_t d = 0; d < D; ++d) {
        const double c = double(row[d]) - mean;
        sq += c * c;
    }
    rstd = 1.0 / std::sqrt(sq / double(D) + eps);
}

// out[d] = (row[d] - mean) * rstd * weight[d] + bias[d], rounded once to F.
template <typename F>
SOUNDSTORM_INLINE void row_normalise(const F* row, int64_t D, double mean, double rstd, const F* weight,
                          const F* bias, F* out) {
    #pragma omp simd
    for (int64_t d = 0; d < D; ++d)
        out[d] = F((double(row[d]) - mean) * rstd * double(weight[d]) + double(bias[d]));
}

// One row of residual_norm: yr = xr + a * dr (rounded to F: the stream the next block
// reads), then nr = LayerNorm(yr).
template <typename F>
SOUNDSTORM_INLINE void residual_norm_row_body(const F* xr, const F* dr, F a, const F* w,
                                              const F* b, double eps, int64_t D, F* yr, F* nr) {
    for (int64_t d = 0; d < D; ++d) {
        const F scaled = a * dr[d];
        yr[d] = xr[d] + scaled;
    }
    double mean, rstd;
    row_moments(yr, D, eps, mean, rstd);
    row_normalise(yr, D, mean, rstd, w, b, nr);
}

SOUNDSTORM_CLONES
void residual_norm_row(const float* xr, const float* dr, float a, const float* w,
                       const float* b, double eps, int64_t D, float* yr, float* nr) {
    residual_norm_row_body(xr, dr, a, w, b, eps, D, yr, nr);
}

SOUNDSTORM_CLONES
void residual_norm_row(const double* xr, const double* dr, double a, const double* w,
                       const double* b, double eps, int64_t D, double* yr, double* nr) {
    residual_norm_row_body(xr, dr, a, w, b, eps, D, yr, nr);
}

// ---------------------------------------------------------------------------------------
// residual_norm: x, delta [N, D] (the wrapper flattens the leading dims); writes y and its
// LayerNorm into y_out and norm_out [N, D].
template <typename F>
void residual_norm(Array<F> x, Array<F> delta, double alpha, Array<F> weight, Array<F> bias,
                   double eps, Array<F> y_out, Array<F> norm_out) {
    const char* op = "residual_norm";
    if (x.ndim() != 2) fail(op, "x must be [N, D]");
    const int64_t N = x.shape(0), D = x.shape(1);
    const auto same = [&](const py::array& a) {
        return a.ndim() == 2 && a.shape(0) == N && a.shape(1) == D;
    };
    if (!same(delta)) fail(op, "delta must have the shape of x");
    if (!same(y_out) || !same(norm_out)) fail(op, "the outputs must have the shape of x");
    if (weight.ndim() != 1 || weight.shape(0) != D || bias.ndim() != 1 || bias.shape(0) != D)
        fail(op, "weight and bias must be [D] with D = " + std::to_string(D));

    const F* xs = x.data();
    const F* ds = delta.data();
    const F* w = weight.data();
    const F* b = bias.data();
    F* ys = y_out.mutable_data();
    F* ns = norm_out.mutable_data();
    // alpha is rounded to the storage type first, as torch.add does with its scalar.
    const F a = F(alpha);

    py::gil_scoped_release release;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
        residual_norm_row(xs + n * D, ds + n * D, a, w, b, eps, D, ys + n * D, ns + n * D);
}

// GLU of one frame h [2E] into x [E]: a * sigmoid(g) with a, g the two halves.
SOUNDSTORM_CLONES
void glu_frame_baseline(const float* h, int64_t E, float* x) {
    const float* a = h;
    const float* g = h + E;
    for (int64_t e = 0; e < E; ++e) x[e] = a[e] * sigmoid(g[e]);
}

// swish in place: y * sigmoid(y).
SOUNDSTORM_CLONES
void swish_baseline(float* y, int64_t E) {
    for (int64_t e = 0; e < E; ++e) y[e] = y[e] * sigmoid(y[e]);
}

#if defined(__x86_64__) && defined(__GNUC__)
// exp of 16 floats (Cephes' expf: n = round(x / ln 2), exp(x) = 2^n * exp(r) with
// r = x - n ln 2 in two parts and a degree-7 polynomial for exp(r)), within 2 ulp of the
// correctly rounded value for x in [-87.3, 88.7]; x is clamped to that range (below it
// exp underflows towards 0, above it the sigmoid is 1 either way). NaN stays NaN.
__attribute__((target("avx512f")))
inline __m512 exp_avx512(__m512 x) {
    const __m512 nan_lanes = x;
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512 e = _mm512_scalef_ps(p, n);
    const __mmask16 nan = _mm512_cmp_ps_mask(nan_lanes, nan_lanes, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(e, nan, nan_lanes);
}

// 1 / (1 + exp(-x)) of 16 floats (one rounding more than the scalar form's exp).
__attribute__((target("avx512f")))
inline __m512 sigmoid_avx512(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    return _mm512_div_ps(one, _mm512_add_ps(one, e));
}

__attribute__((target("avx512f")))
void glu_frame_avx512(const float* h, int64_t E, float* x) {
    const float* a = h;
    const float* g = h + E;
    int64_t e = 0;
    for (; e + 16 <= E; e += 16)
        _mm512_storeu_ps(x + e, _mm512_mul_ps(_mm512_loadu_ps(a + e),
                                              sigmoid_avx512(_mm512_loadu_ps(g + e))));
    if (e < E) {
        const __mmask16 m = static_cast<__mmask16>((1u << (E - e)) - 1u);
        const __m512 ga = _mm512_maskz_loadu_ps(m, g + e);
        _mm512_mask_storeu_ps(x + e, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + e),
                                                      sigmoid_avx512(ga)));
    }
}

__attribute__((target("avx512f")))
void swish_avx512(float* y, int64_t E) {
    int64_t e = 0;
    for (; e + 16 <= E; e += 16) {
        const __m512 v = _mm512_loadu_ps(y + e);
        _mm512_storeu_ps(y + e, _mm512_mul_ps(v, sigmoid_avx512(v)));
    }
    if (e < E) {
        const __mmask16 m = static_cast<__mmask16>((1u << (E - e)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(m, y + e);
        _mm512_mask_storeu_ps(y + e, m, _mm512_mul_ps(v, sigmoid_avx512(v)));
    }
}
#endif

// The sigmoid loops of conv_module: AVX-512 (a polynomial exp) where the CPU has it, else
// the scalar std::exp ones; chosen once at load, switchable for the tests.
struct SigmoidKernels {
    void (*glu)(const float*, int64_t, float*);
    void (*swish)(float*, int64_t);
};

SigmoidKernels pick_sigmoid_kernels(bool avx512) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (avx512 && __builtin_cpu_supports("avx512f")) return {glu_frame_avx512, swish_avx512};
#endif
    return {glu_frame_baseline, swish_baseline};
}

SigmoidKernels sigmoid_kernels = pick_sigmoid_kernels(true);

// One frame of conv_module after the GLU: the depthwise convolution of frame t of the gated
// frames xb [T, E] (taps [K, E]) into acc [E] and its LayerNorm over the channels into y
// [E] (the caller applies the swish).
SOUNDSTORM_CLONES
void conv_frame(const float* xb, int64_t T, int64_t E, int64_t t, const float* taps, int64_t K,
                const float* db, const float* nw, const float* nb, double eps, float* acc,
                float* y) {
    for (int64_t e = 0; e < E; ++e) acc[e] = db[e];
    // tap k reads frame t + k - K/2; frames outside [0, T) are zeros and skipped
    for (int64_t k = 0; k < K; ++k) {
        const int64_t s = t + k - K / 2;
        if (s < 0 || s >= T) continue;
        const float* xs = xb + s * E;
        const float* wk = taps + k * E;
        for (int64_t e = 0; e < E; ++e) {
            const float p = xs[e] * wk[e];
            acc[e] += p;
        }
    }
    double mean, rstd;
    row_moments(acc, E, eps, mean, rstd);
    row_normalise(acc, E, mean, rstd, nw, nb, y);
}

// ---------------------------------------------------------------------------------------
// conv_module: h [B, T, 2E], dw_weight [E, K] (the wrapper drops the middle dim of the
// [E, 1, K] depthwise kernel), dw_bias, norm_weight, norm_bias [E], frame_mask bool [B, T]
// or None; writes [B, T, E] into out.
void conv_module(Array<float> h, Array<float> dw_weight, Array<float> dw_bias,
                 Array<float> norm_weight, Array<float> norm_bias,
                 std::optional<Array<bool>> frame_mask, double eps, Array<float> out) {
    const char* op = "conv_module";
    if (h.ndim() != 3) fail(op, "h must be [B, T, 2E]");
    const int64_t B = h.shape(0), T = h.shape(1), E2 = h.shape(2);
    if (E2 % 2) fail(op, "the last dim of h must be even (GLU halves it)");
    const int64_t E = E2 / 2;
    if (dw_weight.ndim() != 2 || dw_weight.shape(0) != E)
        fail(op, "dw_weight must be [E, K] with E = " + std::to_string(E));
    const int64_t K = dw_weight.shape(1);
    if (K < 1 || K % 2 == 0) fail(op, "the kernel size must be odd, got " + std::to_string(K));
    for (const auto* v : {&dw_bias, &norm_weight, &norm_bias})
        if (v->ndim() != 1 || v->shape(0) != E)
            fail(op, "dw_bias, norm_weight and norm_bias must be [E] with E = " +
                         std::to_string(E));
    if (frame_mask && (frame_mask->ndim() != 2 || frame_mask->shape(0) != B ||
                       frame_mask->shape(1) != T))
        fail(op, "frame_mask must be [B, T]");
    if (out.ndim() != 3 || out.shape(0) != B || out.shape(1) != T || out.shape(2) != E)
        fail(op, "out must be [B, T, E]");

    const float* hs = h.data();
    const float* dw = dw_weight.data();
    const float* db = dw_bias.data();
    const float* nw = norm_weight.data();
    const float* nb = norm_bias.data();
    const bool* mask = frame_mask ? frame_mask->data() : nullptr;
    float* ys = out.mutable_data();

    // taps[k * E + e] = dw_weight[e, k]: each tap contiguous over the channels.
    std::vector<float> taps(K * E);
    for (int64_t e = 0; e < E; ++e)
        for (int64_t k = 0; k < K; ++k) taps[k * E + e] = dw[e * K + k];
    // the gated (and masked) frames of the whole batch, [B, T, E]
    std::vector<float> gated(B * T * E);

    const auto glu = sigmoid_kernels.glu;
    const auto swish = sigmoid_kernels.swish;
    py::gil_scoped_release release;
    #pragma omp parallel
    {
        // 1. GLU: a * sigmoid(g) with a, g the two halves of each frame; zeros for padding.
        #pragma omp for schedule(static)
        for (int64_t bt = 0; bt < B * T; ++bt) {
            float* x = gated.data() + bt * E;
            if (mask && !mask[bt]) {
                for (int64_t e = 0; e < E; ++e) x[e] = 0.0f;
                continue;
            }
            glu(hs + bt * E2, E, x);
        }
        // (the implicit barrier of `omp for`: every gated frame is written before use)

        // 2. per frame: depthwise convolution, LayerNorm over the channels, swish.
        std::vector<float> acc(E);
        #pragma omp for schedule(static)
        for (int64_t bt = 0; bt < B * T; ++bt) {
            const int64_t b = bt / T, t = bt % T;
            conv_frame(gated.data() + b * T * E, T, E, t, taps.data(), K, db, nw, nb, eps,
                       acc.data(), ys + bt * E);
            swish(ys + bt * E, E);
        }
    }
}

}  // namespace
}  // namespace soundstorm

void register_norm(py::module_& m) {
    const char* doc = "y = x + alpha * delta and LayerNorm(y), written into y_out and norm_out "
                      "(see soundstorm.kernels.cpp)";
    m.def("residual_norm", &soundstorm::residual_norm<float>, doc, py::arg("x"),
          py::arg("delta"), py::arg("alpha"), py::arg("weight"), py::arg("bias"),
          py::arg("eps"), py::arg("y_out"), py::arg("norm_out"));
    m.def("residual_norm", &soundstorm::residual_norm<double>, doc, py::arg("x"),
          py::arg("delta"), py::arg("alpha"), py::arg("weight"), py::arg("bias"),
          py::arg("eps"), py::arg("y_out"), py::arg("norm_out"));
    m.def("use_avx512_sigmoid", [](bool on) {
        soundstorm::sigmoid_kernels = soundstorm::pick_sigmoid_kernels(on);
        return soundstorm::sigmoid_kernels.glu != soundstorm::glu_frame_baseline;
    }, "conv_module's GLU and swish with the AVX-512 polynomial exp (where the CPU has it: "
       "returns whether it is used) or with std::exp", py::arg("on"));
    m.def("conv_module", &soundstorm::conv_module,
          "GLU, masking, depthwise convolution, LayerNorm and swish, written into out "
          "(see soundstorm.kernels.cpp)",
          py::arg("h"), py::arg("dw_weight"), py::arg("dw_bias"), py::arg("norm_weight"),
          py::arg("norm_bias"), py::arg("frame_mask"), py::arg("eps"), py::arg("out"));
}
