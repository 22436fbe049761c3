// The Python module lethe._C: importing it loads the library, whose static initialisers register
// the ops. Only this file includes pybind11 (slow to compile); kernels include ATen headers only.
#include <Python.h>
#include <pybind11/pybind11.h>

#include "lethe/cpu_alloc.h"

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
  m.def("cpu_cache_stats", [] {
    const auto s = lethe::cpu_cache_stats();
    py::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["cached_buffers"] = s.cached_buffers;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["limit_bytes"] = s.limit_bytes;
    return d;
  });
  m.def("cpu_cache_release", [] { lethe::cpu_cache_release(); });
}
