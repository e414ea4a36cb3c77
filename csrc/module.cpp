// soundstorm.kernels._C: the C++ CPU kernels of backend "cpp". They work on raw buffers (numpy
// views of CPU tensors, no copies); soundstorm.kernels.cpp wraps them with the signatures
// of the PyTorch references.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_resample(py::module_& m);
void register_embedding(py::module_& m);
void register_norm(py::module_& m);
void register_quant(py::module_& m);
void register_rotary(py::module_& m);

PYBIND11_MODULE(_C, m) {
    m.doc() = "soundstorm C++ CPU kernels (backend 'cpp')";
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
    register_resample(m);
    register_embedding(m);
    register_norm(m);
    register_quant(m);
    register_rotary(m);
}
