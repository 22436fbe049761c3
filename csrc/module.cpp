// The Python module lethe._C: importing it loads the library, whose static initialisers register
// the ops. Only this file includes pybind11 (slow to compile); kernels include ATen headers only.
#include <Python.h>
#include <pybind11/pybind11.h>

#ifndef LETHE_CUDA_ARCHS
#define LETHE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lethe compiled kernels";
  m.def("build_info", [] {
    py::dict d;
#ifdef LETHE_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = LETHE_CUDA_ARCHS;
#if defined(__VERSION__)
    d["compiler"] = __VERSION__;
#endif
    return d;
  });
}
