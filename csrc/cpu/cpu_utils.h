// Helpers shared by the CPU kernels: accumulation types, runtime ISA dispatch of the hot loops,
// per-thread scratch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// 64-byte SIMD values through GCC/Clang vector extensions: one zmm register in the AVX-512 clone,
// two ymm in the AVX2 one, four xmm in the baseline one. Register-blocked micro-kernels keep their
// accumulators in these so that the inner loops do not round-trip through memory.
#if defined(__GNUC__)
#define GFM_HAS_VECTOR_EXT 1
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 8;
};
template <typename T>
GFM_ALWAYS_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}
template <typename T>
GFM_ALWAYS_INLINE void vstore(T* p, const typename Vec<T>::type& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
#else
#define GFM_HAS_VECTOR_EXT 0
#endif

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

// Copies a row into a large output that is not read again soon: non-temporal (streaming) stores
// skip the read-for-ownership of every destination cache line, which otherwise doubles the memory
// traffic of writing tokens. Falls back to memcpy for unaligned rows. Call stream_fence() before
// the written data is handed to another thread or returned.
GFM_ALWAYS_INLINE void stream_row(void* dst, const void* src, int64_t bytes) {
#if defined(__SSE2__)
  constexpr int64_t kChunk = 16;
  if ((reinterpret_cast<uintptr_t>(dst) % kChunk) == 0 && bytes % kChunk == 0) {
    auto* d = static_cast<__m128i*>(dst);
    const auto* s = static_cast<const char*>(src);
    for (int64_t i = 0; i < bytes / kChunk; ++i) {
      _mm_stream_si128(d + i, _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * kChunk)));
    }
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
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
