// Rotary position embedding of one of attention's inputs, on the CPU: the rotation part of
// soundstorm.kernels.attention.rotate for float32, in one pass from the strided view of the
// QKV projection's output into a contiguous [B, H, T, dh] tensor (what the attention that
// follows reads best).
//
// Channel pairs (i, i + dh/2) of frame t turn by the frame's angle:
//   out[i] = x[i] * cos[t, i] - x[i + dh/2] * sin[t, i]
//   out[i + dh/2] = x[i + dh/2] * cos[t, i] + x[i] * sin[t, i]
// with the tables of rotary_tables; each product is rounded before the sum (no fused
// multiply-add: setup.py builds with -ffp-contract=off), so the result equals the
// reference bit for bit. Rows (b, h, t) are independent: parallel with OpenMP.

#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

namespace soundstorm {
namespace {

SOUNDSTORM_CLONES
void rotate_row(const float* x, int64_t step, const float* c, const float* s, int64_t half,
                float* out) {
    if (step == 1) {
        #pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
            const float x1 = x[i], x2 = x[i + half];
            const float a = x1 * c[i], b = x2 * s[i];
            const float d = x2 * c[i], e = x1 * s[i];
            out[i] = a - b;
            out[i + half] = d + e;
        }
        return;
    }
    for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i * step], x2 = x[(i + half) * step];
        const float a = x1 * c[i], b = x2 * s[i];
        const float d = x2 * c[i], e = x1 * s[i];
        out[i] = a - b;
        out[i + half] = d + e;
    }
}

// x: float32 [B, H, T, dh], any strides (a view of the QKV output); cos, sin: [T, dh/2]
// contiguous; out: contiguous [B, H, T, dh].
void rotate(py::array_t<float> x, Array<float> cos, Array<float> sin, Array<float> out) {
    if (x.ndim() != 4) fail("rotate", "x must be [B, H, T, dh]");
    const int64_t B = x.shape(0), H = x.shape(1), T = x.shape(2), dh = x.shape(3);
    if (dh % 2) fail("rotate", "the head dim must be even, got " + std::to_string(dh));
    const int64_t half = dh / 2;
    for (const auto* t : {&cos, &sin})
        if (t->ndim() != 2 || t->shape(0) < T || t->shape(1) != half)
            fail("rotate", "cos and sin must be [>= T, dh/2] with T = " + std::to_string(T) +
                 ", dh/2 = " + std::to_string(half));
    if (out.ndim() != 4 || out.shape(0) != B || out.shape(1) != H || out.shape(2) != T ||
        out.shape(3) != dh)
        fail("rotate", "out must have the shape of x");
    const int64_t fs = sizeof(float);
    for (int d = 0; d < 4; ++d)
        if (x.strides(d) % fs) fail("rotate", "x's strides must be whole floats");
    const int64_t sb = x.strides(0) / fs, sh = x.strides(1) / fs, st = x.strides(2) / fs,
                  sd = x.strides(3) / fs;
    const float* xs = x.data();
    const float* cs = cos.data();
    const float* ss = sin.data();
    float* os = out.mutable_data();
    py::gil_scoped_release release;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < B * H * T; ++r) {
        const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
        rotate_row(xs + b * sb + h * sh + t * st, sd, cs + t * half, ss + t * half, half,
                   os + r * dh);
    }
}

}  // namespace
}  // namespace soundstorm

void register_rotary(py::module_& m) {
    m.def("rotate", &soundstorm::rotate,
          "rotary embedding of x [B, H, T, dh] (any strides) with the tables cos, sin "
          "[T, dh/2], written into the contiguous out (see soundstorm.kernels.cpp)",
          py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"));
}
