// CUDA kernels of the kfac family: the device-generic host functions of lethe/kfac.h (cuBLAS and
// cuSOLVER through ATen do the flops; the batch of a damped inversion goes through strided batched
// GEMMs), registered for CUDA tensors. No kernel of lethe's own: nothing here beats those libraries.
#include <torch/library.h>

#include "lethe/kfac.h"

namespace lethe {

TORCH_LIBRARY_IMPL(lethe, CUDA, m) {
  m.impl("kfac_factor_update", &kfac_factor_update_impl);
  m.impl("kfac_damped_inverse", &kfac_damped_inverse_impl);
  m.impl("kfac_precondition", &kfac_precondition_impl);
  m.impl("kfac_eigen_precondition", &kfac_eigen_precondition_impl);
  m.impl("kfac_eigen_update", &kfac_eigen_update_impl);
}

}  // namespace lethe
