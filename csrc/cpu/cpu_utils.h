// Helpers shared by the CPU kernels: accumulation types, runtime ISA dispatch of the hot loops,
// per-thread scratch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// The hot loops are plain C++ that the compiler vectorises (`#pragma omp simd`). The extension is
// built for the baseline x86-64 ISA so that one wheel runs everywhere; GCC's target_clones compiles
// each hot function again for AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4) and picks the best
// one for the running CPU when the library loads (ifunc), like ATen's DispatchStub does by hand.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && (__GNUC__ >= 12) && \
    !defined(GFM_FAST_NO_TARGET_CLONES)
#define GFM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GFM_CPU_CLONES
#endif

#if defined(__GNUC__)
#define GFM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define GFM_ALWAYS_INLINE inline
#endif

namespace gfm_fast {
namespace cpu {

// fp16/bf16/fp32 accumulate in fp32, fp64 stays fp64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// dst[i] = acc_t(src[i]); the compiler vectorises the fp32 and bf16 conversions.
template <typename acc_t, typename scalar_t>
GFM_ALWAYS_INLINE void load_row(acc_t* __restrict dst, const scalar_t* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

template <typename scalar_t, typename acc_t>
GFM_ALWAYS_INLINE void store_row(scalar_t* __restrict dst, const acc_t* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// t converted to acc_t (no copy when it already is), contiguous.
template <typename acc_t>
inline at::Tensor to_acc(const at::Tensor& t) {
  return t.to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat).contiguous();
}

// Per-thread accumulators: row t belongs to at::get_thread_num() == t inside at::parallel_for,
// so threads never share partial sums; reduce() adds the rows in a fixed order.
template <typename T>
class ThreadPartials {
 public:
  explicit ThreadPartials(int64_t width)
      : width_(width),
        buffer_(at::zeros({at::get_num_threads(), width}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>()))) {}

  // Clamped: a call made from inside someone else's parallel region runs serially in that thread,
  // whose id can exceed the thread count seen from inside the region.
  T* mine() {
    const int64_t slot = std::min<int64_t>(at::get_thread_num(), buffer_.size(0) - 1);
    return buffer_.data_ptr<T>() + slot * width_;
  }

  // (width,) sum over threads.
  at::Tensor reduce() const { return buffer_.sum(0); }

 private:
  int64_t width_;
  at::Tensor buffer_;
};

}  // namespace cpu
}  // namespace gfm_fast
