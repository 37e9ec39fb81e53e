// The memory format of a candidate kernel, shared by the CPU library and the CUDA binding
// (apsfast.ops documents the rule for every backend).
#pragma once

#include <ATen/ATen.h>

namespace apsfast {

// Whether the kernel built from `weight` is channels_last: a 4-D weight with its channels
// innermost (a channels_last meta-weight, or a channel slice of one) and a spatial extent, so
// that a channels_last run's convolutions take it as it is. A 1x1 kernel keeps standard
// strides: both formats hold it in the same memory, and the CPU convolution of an NCHW input
// misreads a 1x1 kernel whose unit dims carry channels_last strides.
inline bool channels_last_kernel(const at::Tensor& weight) {
  return weight.dim() == 4 && weight.size(1) > 1 && weight.size(2) * weight.size(3) > 1 &&
         weight.stride(1) == 1;
}

}  // namespace apsfast
