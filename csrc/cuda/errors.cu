// The per-device records of bad values found by the CUDA kernels (see errors.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>

#include "errors.cuh"

namespace lethe {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;

struct Slot {
  BadValueRecord* host = nullptr;  // host-mapped: kernels write it through `device`
  BadValueRecord* device = nullptr;
  std::once_flag once;
  std::mutex taking;  // one host thread takes the record at a time (autograd's thread, the user's)
};

std::array<Slot, kMaxDevices> slots;

Slot& slot(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "lethe: CUDA device index ", device, " out of range");
  Slot& s = slots[device];
  std::call_once(s.once, [&] {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    // the first lethe op on a device may run inside a CUDA-graph capture, which refuses an
    // allocation in the default (global) capture mode: relaxed for this call only
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, sizeof(BadValueRecord), cudaHostAllocMapped | cudaHostAllocPortable);
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    C10_CUDA_CHECK(err);
    std::memset(p, 0, sizeof(BadValueRecord));
    s.host = static_cast<BadValueRecord*>(p);
    void* d = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&d, p, 0));
    s.device = static_cast<BadValueRecord*>(d);
  });
  return s;
}

// Take the record (and clear it), if a kernel wrote one.
std::optional<BadValueRecord> take(int device) {
  Slot& s = slot(device);
  std::lock_guard<std::mutex> lock(s.taking);
  volatile BadValueRecord* r = s.host;
  if (r->code == 0) return std::nullopt;
  std::atomic_thread_fence(std::memory_order_acquire);  // the fields after the code (the kernel wrote them first)
  BadValueRecord out;
  out.code = r->code;
  out.claim = 1;
  out.row = r->row;
  out.value = r->value;
  out.bound = r->bound;
  out.fvalue = r->fvalue;
  out.tol = r->tol;
  out.ignore = r->ignore;
  r->code = 0;
  std::atomic_thread_fence(std::memory_order_release);
  r->claim = 0;  // last: a kernel may claim the record again from here on
  return out;
}

constexpr const char* kDeferred =
    " (found by a CUDA kernel of an earlier lethe call on this device; set LETHE_SYNC_CHECKS=1 to raise "
    "it at that call)";

}  // namespace

BadValueRecord* bad_value_record(int device) {
  if (const auto rec = take(device)) raise_bad_value(*rec, kDeferred);
  return slot(device).device;
}

bool sync_checks() {
  static const bool on = [] {
    const char* e = std::getenv("LETHE_SYNC_CHECKS");
    return e != nullptr && std::strcmp(e, "1") == 0;
  }();
  return on;
}

void raise_found(int device, cudaStream_t stream, const std::function<void()>& check_on_host) {
  if (!sync_checks()) return;
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (const auto rec = take(device)) {
    check_on_host();  // raises the CPU kernels' message for this call's inputs
    raise_bad_value(*rec, kDeferred);  // the record came from another call (another stream or thread)
  }
}

void check_errors(int device, bool wait) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  if (wait) C10_CUDA_CHECK(cudaDeviceSynchronize());
  bad_value_record(device);
}

}  // namespace cuda
}  // namespace lethe
