// Summed multi-level embedding lookup on the CPU: the counterpart of
// soundstorm.kernels.embedding.summed_embedding_reference.
//
// out[b, t] = semantic_table[semantic[b, floor(t * num / den)]]
//           + sum over q of acoustic_table[row(b, t, q)]
// with row = q * C + token for a code and the shared MASK row (the last) for token >= C.
// The acoustic rows are summed in level order starting from zero and the semantic row is
// added last, the order of the reference (embedding_bag, then the addition), so float
// results agree bit for bit. Frames are independent: parallel over (b, t) with OpenMP.

#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace soundstorm {
namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

[[noreturn]] void fail(const std::string& message) {
    throw std::invalid_argument("summed_embedding: " + message);
}

template <typename F>
void summed_embedding(Array<int64_t> semantic, Array<int64_t> tokens, Array<F> semantic_table,
                      Array<F> acoustic_table, int64_t rate_num, int64_t rate_den,
                      Array<F> out) {
    if (semantic.ndim() != 2) fail("semantic must be [B, S]");
    if (tokens.ndim() != 3) fail("tokens must be [B, T, Q]");
    if (semantic_table.ndim() != 2 || acoustic_table.ndim() != 2)
        fail("the tables must be 2-D");
    const int64_t B = tokens.shape(0), T = tokens.shape(1), Q = tokens.shape(2);
    const int64_t S = semantic.shape(1), V = semantic_table.shape(0);
    const int64_t D = semantic_table.shape(1);
    if (semantic.shape(0) != B) fail("semantic and tokens disagree on the batch size");
    if (acoustic_table.shape(1) != D) fail("the tables disagree on the embedding width");
    if (Q < 1) fail("tokens need at least one level");
    if (rate_num < 0 || rate_den < 1) fail("rate_num must be >= 0 and rate_den >= 1");
    const int64_t mask_row = acoustic_table.shape(0) - 1;
    const int64_t C = mask_row / Q;
    if (out.ndim() != 3 || out.shape(0) != B || out.shape(1) != T || out.shape(2) != D)
        fail("out must be [B, T, D]");

    const int64_t* sem = semantic.data();
    const int64_t* tok = tokens.data();
    const F* stab = semantic_table.data();
    const F* atab = acoustic_table.data();
    F* y = out.mutable_data();

    // Check every index first, so that a bad one raises before any work (as in the
    // reference, which indexes through checked lookups).
    if (T > 0 && (T - 1) * rate_num / rate_den >= S)
        throw py::index_error("summed_embedding: frame " + std::to_string(T - 1) +
                              " reads semantic index " +
                              std::to_string((T - 1) * rate_num / rate_den) +
                              ", beyond the " + std::to_string(S) + " semantic ids");
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const int64_t s = sem[b * S + t * rate_num / rate_den];
            if (s < 0 || s >= V)
                throw py::index_error("summed_embedding: semantic id " + std::to_string(s) +
                                      " is outside [0, " + std::to_string(V) + ")");
        }
    for (int64_t i = 0; i < B * T * Q; ++i)
        if (tok[i] < 0)
            throw py::index_error("summed_embedding: token " + std::to_string(tok[i]) +
                                  " is negative");

    py::gil_scoped_release release;
    #pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < B * T; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        F* o = y + bt * D;
        for (int64_t d = 0; d < D; ++d) o[d] = F(0);
        for (int64_t q = 0; q < Q; ++q) {
            const int64_t token = tok[bt * Q + q];
            const int64_t row = token >= C ? mask_row : q * C + token;
            const F* a = atab + row * D;
            for (int64_t d = 0; d < D; ++d) o[d] += a[d];
        }
        const F* e = stab + sem[b * S + t * rate_num / rate_den] * D;
        for (int64_t d = 0; d < D; ++d) o[d] = e[d] + o[d];
    }
}

}  // namespace
}  // namespace soundstorm

void register_embedding(py::module_& m) {
    const char* doc = "Summed embedding written into `out` (see soundstorm.kernels.cpp)";
    m.def("summed_embedding", &soundstorm::summed_embedding<float>, doc, py::arg("semantic"),
          py::arg("tokens"), py::arg("semantic_table"), py::arg("acoustic_table"),
          py::arg("rate_num"), py::arg("rate_den"), py::arg("out"));
    m.def("summed_embedding", &soundstorm::summed_embedding<double>, doc, py::arg("semantic"),
          py::arg("tokens"), py::arg("semantic_table"), py::arg("acoustic_table"),
          py::arg("rate_num"), py::arg("rate_den"), py::arg("out"));
}
