// The Python module lethe._C: importing it loads the library, whose static initialisers register
// the kernels of the ops that python/lethe/ops declares. Only this file includes pybind11 (slow
// to compile); kernels include ATen headers only.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <c10/util/Exception.h>

#include "lethe/cpu_alloc.h"

#ifndef LETHE_CUDA_ARCHS
#define LETHE_CUDA_ARCHS ""
#endif

#ifdef LETHE_WITH_CUDA
namespace lethe {
namespace cuda {
void check_errors(int device, bool wait);  // csrc/cuda/errors.cu
}  // namespace cuda
}  // namespace lethe
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lethe compiled kernels";
  // the errors of this module's functions reach Python as torch's ops raise them (module-local:
  // a global translator would also catch torch's own errors)
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
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
#ifdef LETHE_WITH_CUDA
  m.def("check_errors", &lethe::cuda::check_errors, py::arg("device"), py::arg("wait"),
        py::call_guard<py::gil_scoped_release>(),
        "Raise the first bad input a CUDA kernel recorded on the device (after waiting for it).");
#endif
}
