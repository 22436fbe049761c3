#pragma once
// Bad values found by the CUDA kernels (target ids out of range, negative or unnormalised target
// probabilities, labels out of range), reported without a host sync. Each device has one record
// (lethe/checks.h BadValueRecord) in host-mapped pinned memory: a kernel that finds a bad value
// skips it (never reading out of bounds) and records the first one; the host reads the record
// without waiting, at the start of every lethe CUDA op (which then raises it: "found by a CUDA
// kernel of an earlier lethe call"), and lethe.ops.check_errors() raises it after waiting for the
// device. With LETHE_SYNC_CHECKS=1 (for debugging) every op waits for its kernels and raises at
// the call itself, with the CPU kernels' message (found again on the inputs copied to the host).
// Nothing here blocks CUDA-graph capture, except LETHE_SYNC_CHECKS=1.
#include <cuda_runtime.h>

#include <functional>

#include "lethe/checks.h"

namespace lethe {
namespace cuda {

// The device pointer of `device`'s record, for kernels; raises a pending record first.
BadValueRecord* bad_value_record(int device);

// Whether LETHE_SYNC_CHECKS=1.
bool sync_checks();

// Under LETHE_SYNC_CHECKS=1: wait for stream, and when a kernel recorded a bad value, raise:
// check_on_host() (the CPU kernels' check on host copies of the call's inputs) first, else the
// record. Else nothing, at once.
void raise_found(int device, cudaStream_t stream, const std::function<void()>& check_on_host);

// Raise the pending record of device (after waiting for it when wait).
void check_errors(int device, bool wait);

// Record a bad value: the first of the kernels that report one wins.
// ignore: the labels' ignore index (a kLabel record's message names it).
__device__ __forceinline__ void report_bad_value(BadValueRecord* rec, BadValue code, int64_t row, int64_t value,
                                                 int64_t bound, double fvalue, double tol, int64_t ignore = -100) {
  if (atomicCAS(reinterpret_cast<int*>(&rec->claim), 0, 1) == 0) {
    rec->row = row;
    rec->value = value;
    rec->bound = bound;
    rec->fvalue = fvalue;
    rec->tol = tol;
    rec->ignore = ignore;
    __threadfence_system();
    atomicExch(reinterpret_cast<int*>(&rec->code), static_cast<int>(code));
  }
}

}  // namespace cuda
}  // namespace lethe
