#pragma once
// Argument checks shared by the CPU and CUDA kernels of every family (the C++ side of
// python/lethe/ops/checks.py, worded the same way: the same bad input gets the same message from
// every backend). Wrong dtypes raise TypeError, wrong shapes, devices and values ValueError (in
// Python). Shapes print as lists, dtypes as torch.<name>, floats as %g. Each family's own checks
// are in lethe/<family>_checks.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>
#include <algorithm>
#include <initializer_list>
#include <utility>

// Dispatch over the three accepted float dtypes only (no double instantiations).
#define LETHE_DISPATCH_FLOATS(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace lethe {

// "torch.float32", as Python prints a dtype.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A float in a message as Python's %g prints it: NaN as "nan" whatever its sign (glibc: "-nan").
struct Num {
  double v;
};
inline std::ostream& operator<<(std::ostream& os, Num n) {
  if (std::isnan(n.v)) return os << "nan";
  return os << n.v;
}

// Whether two tensors' bytes overlap (as overlap of checks.py: same storage, intersecting ranges).
inline bool overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      a.storage().data() != b.storage().data())
    return false;
  const char* a0 = static_cast<const char*>(a.data_ptr());
  const char* b0 = static_cast<const char*>(b.data_ptr());
  return a0 < b0 + b.numel() * b.element_size() && b0 < a0 + a.numel() * a.element_size();
}

// No tensor of `outs` (written in place) shares a byte with another tensor of outs or of the
// input lists; inputs may alias each other (checks.py's no_overlap: the same sweep, the same
// first overlap in address order, the same words).
inline void check_no_overlap(at::TensorList outs, const char* out_name,
                             std::initializer_list<std::pair<const char*, at::TensorList>> inputs) {
  struct Iv {
    uintptr_t a, b;
    const char* name;
    size_t j;
    bool out;
  };
  std::vector<Iv> iv;
  auto add = [&](const char* name, at::TensorList ts, bool out) {
    for (size_t j = 0; j < ts.size(); ++j) {
      if (ts[j].numel() == 0 || !ts[j].has_storage()) continue;
      const uintptr_t a = reinterpret_cast<uintptr_t>(ts[j].data_ptr());
      iv.push_back({a, a + static_cast<uintptr_t>(ts[j].numel() * ts[j].element_size()), name, j, out});
    }
  };
  add(out_name, outs, true);
  for (const auto& in : inputs) add(in.first, in.second, false);
  std::stable_sort(iv.begin(), iv.end(), [](const Iv& x, const Iv& y) { return x.a < y.a || (x.a == y.a && x.b < y.b); });
  const Iv* last_all = nullptr;
  const Iv* last_out = nullptr;
  for (const Iv& v : iv) {
    const Iv* hit = v.out ? last_all : last_out;
    if (hit != nullptr && v.a < hit->b) {
      const Iv& o = hit->out ? *hit : v;
      const Iv& other = hit->out ? v : *hit;
      TORCH_CHECK_VALUE(false, o.name, "[", o.j, "] must not overlap ", other.name, "[", other.j, "]");
    }
    if (last_all == nullptr || v.b > last_all->b) last_all = &v;
    if (v.out && (last_out == nullptr || v.b > last_out->b)) last_out = &v;
  }
}

inline bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float(t), name, " must be float32, float16 or bfloat16, got ",
                   dtype_name(t.scalar_type()));
}

// t has dtype `want`, named as Python names it without "torch." ("int64", "bool").
inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", dtype_name(want).substr(6), ", got ",
                   dtype_name(t.scalar_type()));
}

inline void check_dims(const at::Tensor& t, const char* name, int64_t n, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == n, name, " must be ", n, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref_name, "'s device (",
                    ref.device(), "), got ", t.device());
}

// An optional float vector [N] on ref's device (row_weight, grad_row_scale, grad_loss, lse).
inline void check_row_vector(const std::optional<at::Tensor>& t, const char* name, int64_t N,
                             const at::Tensor& ref, const char* ref_name) {
  if (!t.has_value() || !t->defined()) return;
  check_float(*t, name);
  check_same_device(*t, name, ref, ref_name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == N, name, " must have shape [N] = [", N, "], got ",
                    t->sizes());
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ---- bad values found inside kernels: on the CPU they raise at once; the CUDA kernels record
// the first one without a host sync (csrc/cuda/errors.cuh), and it is raised at the next lethe call
// on that device, or at the call itself under LETHE_SYNC_CHECKS=1.

enum class BadValue : int32_t { kNone = 0, kTargetId = 1, kTargetNegative = 2, kTargetSum = 3, kLabel = 4 };

// What a kernel records about the first bad value: which check, where, what.
struct BadValueRecord {
  int32_t code;   // BadValue
  int32_t claim;  // set by the one thread that writes the record
  int64_t row;    // the row (target checks) or the flat index (labels)
  int64_t value;  // the bad id or label
  int64_t bound;  // V
  double fvalue;  // the bad probability, or the row's sum
  double tol;     // the tolerance of the sum check
  int64_t ignore = -100;  // the labels' ignore index (labels)
};

// note: appended to the message (the CUDA kernels' deferred reports say where they come from).
[[noreturn]] inline void raise_bad_value(const BadValueRecord& r, const char* note = "") {
  switch (static_cast<BadValue>(r.code)) {
    case BadValue::kTargetId:
      TORCH_CHECK_VALUE(false, "target_ids must be in [0, V) = [0, ", r.bound, "), got ", r.value,
                        " in row ", r.row, note);
    case BadValue::kTargetNegative:
      TORCH_CHECK_VALUE(false, "target_probs must be non-negative, got ", Num{r.fvalue}, " in row ", r.row, note);
    case BadValue::kTargetSum:
      TORCH_CHECK_VALUE(false, "target_probs rows must sum to 1 (within ", Num{r.tol},
                        ") or be all zero, row ", r.row, " sums to ", Num{r.fvalue}, note);
    case BadValue::kLabel:
      TORCH_CHECK_VALUE(false, "labels must be in [0, V) = [0, ", r.bound, ") or ", r.ignore, ", got ", r.value,
                        " at index ", r.row, note);
    default:
      TORCH_CHECK(false, "lethe: unknown bad-value record ", r.code);
  }
}

}  // namespace lethe
