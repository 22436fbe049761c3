// The per-device records of bad values found by the CUDA kernels (see errors.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "errors.cuh"

namespace lethe {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;

struct Slot {
  BadValueRecord* host = nullptr;  // host-mapped: kernels write it through `device`
  BadValueRecord* device = nullptr;
  std::once_flag once;
};

std::array<Slot, kMaxDevices> slots;

Slot& slot(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "lethe: CUDA device index ", device, " out of range");
  Slot& s = slots[device];
  std::call_once(s.once, [&] {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* p = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&p, sizeof(BadValueRecord), cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(p, 0, sizeof(BadValueRecord));
    s.host = static_cast<BadValueRecord*>(p);
    void* d = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&d, p, 0));
    s.device = static_cast<BadValueRecord*>(d);
  });
  return s;
}

// Take the record (and clear it); false when none.
bool take(int device, BadValueRecord* out) {
  volatile BadValueRecord* r = slot(device).host;
  if (r->code == 0) return false;
  out->code = r->code;
  out->row = r->row;
  out->value = r->value;
  out->bound = r->bound;
  out->fvalue = r->fvalue;
  out->tol = r->tol;
  r->code = 0;
  r->claim = 0;  // last: a kernel may claim the record again from here on
  return true;
}

constexpr const char* kDeferred =
    " (found by a CUDA kernel of an earlier lethe call on this device; set LETHE_SYNC_CHECKS=1 to raise "
    "it at that call)";

}  // namespace

BadValueRecord* bad_value_record(int device) {
  BadValueRecord rec;
  if (take(device, &rec)) raise_bad_value(rec, kDeferred);
  return slot(device).device;
}

bool sync_checks() {
  static const bool on = [] {
    const char* e = std::getenv("LETHE_SYNC_CHECKS");
    return e != nullptr && std::strcmp(e, "1") == 0;
  }();
  return on;
}

bool bad_value_found(int device, cudaStream_t stream) {
  if (!sync_checks()) return false;
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  BadValueRecord rec;
  return take(device, &rec);
}

void check_errors(int device, bool wait) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  if (wait) C10_CUDA_CHECK(cudaDeviceSynchronize());
  bad_value_record(device);
}

}  // namespace cuda
}  // namespace lethe
