// Helpers shared by the CUDA kernels: warp/block reductions, launch sizes, device checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace gfm_fast {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// fp16/bf16/fp32 accumulate in fp32, fp64 in fp64.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename T>
__device__ __forceinline__ T max_of(T a, T b) {
  return a > b ? a : b;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the result. `scratch` holds
// one T per warp; consecutive calls may reuse it (the leading barrier protects the last read).
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  value = warp_sum(value);
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? scratch[lane] : T(0);
    value = warp_sum(value);
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  return scratch[0];
}

// A grid-stride launch size: enough blocks to fill the GPU a few times over, no more than needed.
inline int64_t grid_for(int64_t work_items, int threads, int blocks_per_sm = 8) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (work_items + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, sms * blocks_per_sm));
}

inline void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": the CUDA kernel got a tensor on ", t.device(), "; all inputs must be CUDA tensors");
}

}  // namespace cuda
}  // namespace gfm_fast
