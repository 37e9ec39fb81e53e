// Element types of the CUDA kernels: the accumulator type of each stored type and the
// conversions between them (float for the 16-bit types and float32, double for float64).
// Pure CUDA, shared by every .cu of this folder.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace apsfast_cuda {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Elem<double> {
  using Acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Elem<__half> {
  using Acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace apsfast_cuda
