// Confidence-based masked resampling on the CPU: the counterpart of
// soundstorm.kernels.resample.masked_resample_reference (see its docstring for the
// semantics). The Python wrapper (soundstorm.kernels.cpp) expands every per-step parameter
// to one value per row, converts the logits to contiguous float32 and passes CPU tensors
// as zero-copy numpy views; this file works on those raw buffers.
//
// Per row b, per frame t (frames in parallel with OpenMP):
//   1. load the frame's C logits, sanitising on the way (NaN -> -inf, +inf -> FLT_MAX),
//      and find their maximum and first argmax (the greedy candidate);
//   2. if the row samples: candidate = first argmax of logits / temperature + gumbel(hash),
//      the hash being rng.code_keys for (seed, level, iteration, candidate stream, t, c);
//   3. confidence = logits[candidate] - logsumexp(logits) + noise_scale * gumbel(hash of
//      (seed, level, iteration, confidence stream, t)).
//   A frame with no finite logit gets candidate 0 and confidence -inf.
// Then per row: keep the num_keep[b] eligible frames ranked first by (confidence
// descending, frame ascending) -- the order of the reference's two stable sorts -- found
// by selection (std::nth_element), not a full sort, and write their candidates.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SOUNDSTORM_HAVE_AVX512_VARIANT 1
#endif

#include "rng.h"

namespace py = pybind11;

namespace soundstorm {
namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float POS_INF = std::numeric_limits<float>::infinity();
constexpr float FLOAT32_MAX = std::numeric_limits<float>::max();

// Everything one frame needs; filled per row, read by the per-frame kernel.
struct FrameParams {
    const float* logits;      // [C] of this frame
    float* scratch;           // [C] sanitised logits (per thread)
    int64_t num_codes;
    bool sample;              // draw the candidate (else argmax)
    float temperature;        // > 0 where sample
    uint32_t candidate_key;   // rng.frame_keys(step key of the candidate stream)[t]
    const float* gumbel;      // [2**23] gumbel value of each 23-bit uniform (see rng.h)
    float gumbel_max;         // the table's largest value
    bool need_confidence;
};

struct FrameResult {
    int64_t candidate;
    float log_p;              // log-probability of the candidate; -inf for a dead frame
};

// exp(x) for x <= 0 (x = -inf included), within a few ulp, in a form that vectorises
// (the classic Cephes expf: 2**n times a polynomial on the reduced argument). It feeds
// only the log-sum-exp of the confidence, which no backend rounds exactly like another
// anyway; the candidates, which must match bit for bit, never go through it.
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;                      // exp(-87) ~ 1.6e-38: adds nothing
    const float t = x * 1.44269504088896341f + 0.5f;  // n = floor(x / ln 2 + 1/2)
    int n = int(t);
    n -= float(n) > t;
    const float z = float(n);
    x = x - z * 0.693359375f;                         // x - n ln 2, in two parts
    x = x - z * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    const float scale = __builtin_bit_cast(float, (n + 127) << 23);  // 2**n, n in [-126, 0]
    return y * scale;
}

// The per-frame work, written once and compiled twice: for the baseline x86-64 target and
// for AVX-512 (chosen at run time). The loops are kept simple so that the compiler
// vectorises the sanitising, the maximum and the exponentials.
// sum over c of exp(s[c] - best), the portable way (the compiler vectorises it).
static inline __attribute__((always_inline)) float exp_sum(const float* s, int64_t C, float best) {
    float sum = 0.0f;
    #pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) sum += exp_nonpositive(s[c] - best);
    return sum;
}

#ifdef SOUNDSTORM_HAVE_AVX512_VARIANT
// The same with AVX-512 intrinsics, sixteen codes at a time: exp_nonpositive lane-wise.
__attribute__((target("avx512f")))
float exp_sum_avx512(const float* s, int64_t C, float best) {
    const __m512 vbest = _mm512_set1_ps(best);
    __m512 acc = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        __m512 x = _mm512_sub_ps(_mm512_loadu_ps(s + c), vbest);
        x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
        const __m512 t = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _mm512_set1_ps(0.5f));
        const __m512 z = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        x = _mm512_sub_ps(x, _mm512_mul_ps(z, _mm512_set1_ps(0.693359375f)));
        x = _mm512_sub_ps(x, _mm512_mul_ps(z, _mm512_set1_ps(-2.12194440e-4f)));
        __m512 y = _mm512_set1_ps(1.9875691500e-4f);
        y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(1.3981999507e-3f));
        y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(8.3334519073e-3f));
        y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(4.1665795894e-2f));
        y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(1.6666665459e-1f));
        y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(5.0000001201e-1f));
        y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(y, x), x), x),
                          _mm512_set1_ps(1.0f));
        const __m512i n = _mm512_cvttps_epi32(z);  // z is integral: exact
        const __m512 scale = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(y, scale));
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; c < C; ++c) sum += exp_nonpositive(s[c] - best);
    return sum;
}
#endif

template <float (*ExpSum)(const float*, int64_t, float)>
static inline __attribute__((always_inline)) FrameResult frame_kernel_body(const FrameParams& p) {
    const int64_t C = p.num_codes;
    const float* x = p.logits;
    float* s = p.scratch;
    // 1. sanitise and take the maximum, then its first index (the greedy candidate).
    //    `omp simd reduction` lets the compiler vectorise the reductions without -ffast-math.
    float best = NEG_INF;
    #pragma omp simd reduction(max : best)
    for (int64_t c = 0; c < C; ++c) {
        float v = x[c];
        v = std::isnan(v) ? NEG_INF : (v == POS_INF ? FLOAT32_MAX : v);
        s[c] = v;
        best = v > best ? v : best;
    }
    if (best == NEG_INF) return FrameResult{0, NEG_INF};  // dead frame
    int64_t greedy = 0;
    while (s[greedy] != best) ++greedy;
    int64_t candidate = greedy;
    // 2. Gumbel-max: the first argmax of s / temperature + gumbel, each step rounded to
    //    float32 as torch does (no fused multiply-add: -ffp-contract=off). The table
    //    lookups are random reads of a 32 MiB table: the hashes of a block of codes are
    //    computed and their table entries prefetched before the block is scored.
    //    No Gumbel value exceeds gumbel_max, so a code with s / temperature + gumbel_max
    //    below the best value so far can neither win nor tie: its lookup is skipped
    //    (float addition is monotone, so the skip is exact). The greedy code's value is
    //    the first bound; with a peaked distribution most lookups are skipped.
    if (p.sample) {
        constexpr int64_t BLOCK = 64;
        float scaled[BLOCK];
        uint32_t index[BLOCK];
        const auto hash = [&](int64_t c) {
            return rng::mix32(p.candidate_key ^ (uint32_t(c) * rng::GOLDEN32)) >> 9;
        };
        float drawn_best = s[greedy] / p.temperature + p.gumbel[hash(greedy)];
        int64_t drawn = greedy;
        for (int64_t c0 = 0; c0 < C; c0 += BLOCK) {
            const int64_t n = C - c0 < BLOCK ? C - c0 : BLOCK;
            const float bound = drawn_best;
            for (int64_t i = 0; i < n; ++i) {
                scaled[i] = s[c0 + i] / p.temperature;
                index[i] = hash(c0 + i);
            }
            for (int64_t i = 0; i < n; ++i)
                if (!(scaled[i] + p.gumbel_max < bound)) __builtin_prefetch(p.gumbel + index[i]);
            for (int64_t i = 0; i < n; ++i) {
                if (scaled[i] + p.gumbel_max < bound) continue;
                const float v = scaled[i] + p.gumbel[index[i]];
                // the first maximum wins, as in torch.argmax
                if (v > drawn_best || (v == drawn_best && c0 + i < drawn)) {
                    drawn_best = v;
                    drawn = c0 + i;
                }
            }
        }
        candidate = drawn;
    }
    if (!p.need_confidence) return FrameResult{candidate, 0.0f};
    // 3. log-softmax of the candidate: s[candidate] - (max + log(sum exp(s - max)))
    const float sum = ExpSum(s, C, best);
    return FrameResult{candidate, s[candidate] - (std::log(sum) + best)};
}

float exp_sum_baseline(const float* s, int64_t C, float best) { return exp_sum(s, C, best); }

FrameResult frame_kernel_baseline(const FrameParams& p) {
    return frame_kernel_body<exp_sum_baseline>(p);
}

#ifdef SOUNDSTORM_HAVE_AVX512_VARIANT
__attribute__((target("avx512f")))
FrameResult frame_kernel_avx512(const FrameParams& p) {
    return frame_kernel_body<exp_sum_avx512>(p);
}
#endif

using FrameKernel = FrameResult (*)(const FrameParams&);

FrameKernel pick_frame_kernel() {
#ifdef SOUNDSTORM_HAVE_AVX512_VARIANT
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return frame_kernel_avx512;
#endif
    return frame_kernel_baseline;
}

// Set once at import; tests switch to the baseline to check both variants.
FrameKernel frame_kernel = pick_frame_kernel();

// --- argument checking ---------------------------------------------------------------

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument("masked_resample: " + message);
}

template <typename T>
void require_shape(const Array<T>& a, const char* name, std::vector<py::ssize_t> shape) {
    bool ok = a.ndim() == py::ssize_t(shape.size());
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
    if (!ok) {
        std::string want = "[";
        for (size_t i = 0; i < shape.size(); ++i)
            want += (i ? ", " : "") + std::to_string(shape[i]);
        throw std::invalid_argument(std::string("masked_resample: ") + name +
                                    " must have shape " + want + "]");
    }
}

// --- the op ----------------------------------------------------------------------------

// out: int64 [B, T] holding the current tokens; the kept candidates are written into it.
void masked_resample(Array<float> logits, Array<int64_t> out, Array<bool> eligible,
                     py::object num_keep_obj, Array<int64_t> seeds, Array<int64_t> level,
                     Array<int64_t> iteration, Array<float> temperature,
                     Array<float> noise_scale, Array<bool> sample, bool any_sample,
                     bool any_noise, Array<float> gumbel, float gumbel_max) {
    require(logits.ndim() == 3, "logits must be [B, T, C]");
    const int64_t B = logits.shape(0), T = logits.shape(1), C = logits.shape(2);
    require(C >= 1, "logits need at least one code");
    require_shape(out, "tokens", {B, T});
    require_shape(eligible, "eligible", {B, T});
    require_shape(seeds, "seeds", {B});
    require_shape(level, "level", {B});
    require_shape(iteration, "iteration", {B});
    require_shape(temperature, "temperature", {B});
    require_shape(noise_scale, "noise_scale", {B});
    require_shape(sample, "sample", {B});
    require_shape(gumbel, "gumbel table", {py::ssize_t(1) << 23});
    const bool keep_all = num_keep_obj.is_none();
    Array<int64_t> num_keep;
    if (!keep_all) {
        num_keep = py::cast<Array<int64_t>>(num_keep_obj);
        require_shape(num_keep, "num_keep", {B});
    }

    const float* x = logits.data();
    int64_t* tok = out.mutable_data();
    const bool* elig = eligible.data();
    const int64_t* seed = seeds.data();
    const int64_t* lvl = level.data();
    const int64_t* it = iteration.data();
    const float* temp = temperature.data();
    const float* scale = noise_scale.data();
    const bool* samp = sample.data();
    const float* table = gumbel.data();
    const int64_t* keep_k = keep_all ? nullptr : num_keep.data();

    std::vector<int64_t> candidate(B * T);
    std::vector<float> confidence(keep_all ? 0 : B * T);

    py::gil_scoped_release release;

    // Per-frame candidates and confidences, all frames of all rows in parallel.
    #pragma omp parallel
    {
        std::vector<float> scratch(C);
        #pragma omp for schedule(static)
        for (int64_t bt = 0; bt < B * T; ++bt) {
            const int64_t b = bt / T, t = bt % T;
            if (!elig[bt]) continue;  // never written: candidate and confidence unused
            FrameParams p;
            p.logits = x + bt * C;
            p.scratch = scratch.data();
            p.num_codes = C;
            p.sample = any_sample && samp[b];
            // rows that do not sample may carry temperature 0 (the reference keeps it 1)
            p.temperature = temp[b] > 0.0f ? temp[b] : 1.0f;
            p.candidate_key = p.sample
                ? rng::frame_key(rng::step_key(seed[b], lvl[b], it[b], rng::STREAM_CANDIDATE), t)
                : 0;
            p.gumbel = table;
            p.gumbel_max = gumbel_max;
            p.need_confidence = !keep_all;
            const FrameResult r = frame_kernel(p);
            candidate[bt] = r.candidate;
            if (!keep_all) {
                float conf = r.log_p;
                if (any_noise && conf != NEG_INF) {
                    const uint32_t h = rng::frame_key(
                        rng::step_key(seed[b], lvl[b], it[b], rng::STREAM_CONFIDENCE), t);
                    conf = conf + scale[b] * table[h >> 9];
                }
                confidence[bt] = conf;
            }
        }
    }

    // Per row: choose the frames to keep and write their candidates.
    #pragma omp parallel
    {
        std::vector<int64_t> frames;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; ++b) {
            const int64_t row = b * T;
            frames.clear();
            for (int64_t t = 0; t < T; ++t)
                if (elig[row + t]) frames.push_back(t);
            const int64_t n = int64_t(frames.size());
            int64_t k = keep_all ? n : std::max<int64_t>(0, std::min<int64_t>(keep_k[b], n));
            if (k < n) {
                // The reference's order: higher confidence first, ties to the earlier
                // frame. This is a strict total order, so the first k after selection are
                // exactly the reference's first k.
                const float* conf = confidence.data() + row;
                auto before = [conf](int64_t a, int64_t c) {
                    return conf[a] > conf[c] || (conf[a] == conf[c] && a < c);
                };
                std::nth_element(frames.begin(), frames.begin() + k, frames.end(), before);
            }
            for (int64_t i = 0; i < k; ++i) tok[row + frames[i]] = candidate[row + frames[i]];
        }
    }
}

// The hashes of rng.py, exposed so that tests can check them bit for bit.
py::array_t<int64_t> step_keys(Array<int64_t> seeds, Array<int64_t> level,
                               Array<int64_t> iteration, int64_t stream) {
    const int64_t B = seeds.shape(0);
    require_shape(level, "level", {B});
    require_shape(iteration, "iteration", {B});
    py::array_t<int64_t> keys(B);
    for (int64_t b = 0; b < B; ++b)
        keys.mutable_data()[b] = rng::step_key(seeds.data()[b], level.data()[b],
                                               iteration.data()[b], uint32_t(stream));
    return keys;
}

py::array_t<int64_t> frame_keys(Array<int64_t> keys, int64_t num_frames) {
    const int64_t B = keys.shape(0);
    py::array_t<int64_t> out({B, num_frames});
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < num_frames; ++t)
            out.mutable_data()[b * num_frames + t] = rng::frame_key(uint32_t(keys.data()[b]), t);
    return out;
}

py::array_t<int64_t> code_keys(Array<int64_t> fkeys, int64_t num_codes) {
    const int64_t N = fkeys.size();
    py::array_t<int64_t> out({N, num_codes});
    for (int64_t i = 0; i < N; ++i)
        for (int64_t c = 0; c < num_codes; ++c)
            out.mutable_data()[i * num_codes + c] =
                rng::mix32(uint32_t(fkeys.data()[i]) ^ (uint32_t(c) * rng::GOLDEN32));
    return out;
}

}  // namespace
}  // namespace soundstorm

void register_resample(py::module_& m) {
    m.def("masked_resample", &soundstorm::masked_resample,
          "Masked resampling in place on `tokens` (see soundstorm.kernels.cpp)",
          py::arg("logits"), py::arg("tokens"), py::arg("eligible"), py::arg("num_keep"),
          py::arg("seeds"), py::arg("level"), py::arg("iteration"), py::arg("temperature"),
          py::arg("noise_scale"), py::arg("sample"), py::arg("any_sample"),
          py::arg("any_noise"), py::arg("gumbel"), py::arg("gumbel_max"));
    m.def("step_keys", &soundstorm::step_keys);
    m.def("frame_keys", &soundstorm::frame_keys);
    m.def("code_keys", &soundstorm::code_keys);
    m.def("avx512_kernels", []() {
        return soundstorm::frame_kernel != soundstorm::frame_kernel_baseline;
    }, "Whether the per-frame kernels run their AVX-512 variant on this CPU");
    m.def("use_avx512_kernels", [](bool on) {
        soundstorm::frame_kernel = on ? soundstorm::pick_frame_kernel()
                                      : soundstorm::frame_kernel_baseline;
        return soundstorm::frame_kernel != soundstorm::frame_kernel_baseline;
    }, "Use the AVX-512 variant where the CPU has it (True) or the baseline (False); "
       "returns whether the AVX-512 variant is now in use");
}
