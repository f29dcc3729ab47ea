// CPU kernels of window_attention: the core of Swin's window attention, softmax(scale * q k^T + bias) v,
// forward and backward, one (window, head) at a time.
//
// At Swin's windows (N = 36 or 49 tokens, head_dim 32) every matrix of one (window, head) fits in L1,
// and batched GEMM libraries run these shapes at ~1/10 of their large-matrix rate (call overhead,
// packing); the reference path also copies q, k, v out of the qkv projection (permute), the output
// back into token order (transpose) and the gradients of q, k, v into one qkv gradient (stack). Here
// a task reads its head's q, k, v rows straight from the projection output (W, N, 3C), keeps every
// intermediate in a small scratch, and writes the output (and in the backward the qkv gradient) in
// the layouts the neighbouring linear layers read. The six small GEMMs (two forward, four backward)
// share one register-blocked micro-kernel; the softmax uses a vectorised exp.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

// The row copies here are 32-50 elements: GCC would turn their loops into memcpy/memmove calls,
// which cost more than the copies (17% of the kernels' time when it did).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

namespace gfm_fast {
namespace {

using cpu::acc_type;

constexpr const char* kForward = "window_attention";
constexpr const char* kBackward = "_window_attention_backward";

// Rows of the scratch and of the saved probabilities are padded to this many elements (one fp32
// SIMD vector, two fp64 ones), so that every row is whole vectors. Must match the fake kernel.
constexpr int64_t kRowPad = 16;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ---- micro-kernel: C (RB x NV vectors) = op(A) (RB x K) @ B (K x NV vectors) ----
// op(A) = A (row stride lda) or, with kTransA, A^T of a (K x RB) block (A[k * lda + r]).

#if GFM_HAS_VECTOR_EXT
template <typename T, bool kTransA, int RB, int NV>
GFM_ALWAYS_INLINE void gemm_tile(const T* __restrict A, int64_t lda, const T* __restrict B, int64_t ldb,
                                 T* __restrict C, int64_t ldc, int64_t K) {
  using V = typename cpu::Vec<T>::type;
  constexpr int64_t L = cpu::Vec<T>::lanes;
  V acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = cpu::vload(B + k * ldb + v * L);
    for (int r = 0; r < RB; ++r) {
      const T a = kTransA ? A[k * lda + r] : A[r * lda + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) cpu::vstore(C + r * ldc + v * L, acc[r][v]);
}

template <typename T, bool kTransA, int NV>
GFM_ALWAYS_INLINE void gemm_columns(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M,
                                    int64_t K) {
  constexpr int RB = NV <= 2 ? 6 : 4;  // RB * NV accumulators + NV operands stay within 32 zmm registers
  const int64_t step = kTransA ? 1 : lda;  // from one row of op(A) to the next
  int64_t m = 0;
  for (; m + RB <= M; m += RB) gemm_tile<T, kTransA, RB, NV>(A + m * step, lda, B, ldb, C + m * ldc, ldc, K);
  for (; m < M; ++m) gemm_tile<T, kTransA, 1, NV>(A + m * step, lda, B, ldb, C + m * ldc, ldc, K);
}
#endif

// C (M x cols) = op(A) (M x K) @ B (K x cols), row-major with the given row strides; cols is a
// multiple of the SIMD width (the scratch pads every row to one).
template <bool kTransA, typename T>
GFM_ALWAYS_INLINE void gemm(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t K,
                            int64_t cols) {
#if GFM_HAS_VECTOR_EXT
  constexpr int64_t L = cpu::Vec<T>::lanes;
  const int64_t vecs = cols / L;
  int64_t v = 0;
  for (; v + 4 <= vecs; v += 4) gemm_columns<T, kTransA, 4>(A, lda, B + v * L, ldb, C + v * L, ldc, M, K);
  switch (vecs - v) {
    case 3: gemm_columns<T, kTransA, 3>(A, lda, B + v * L, ldb, C + v * L, ldc, M, K); break;
    case 2: gemm_columns<T, kTransA, 2>(A, lda, B + v * L, ldb, C + v * L, ldc, M, K); break;
    case 1: gemm_columns<T, kTransA, 1>(A, lda, B + v * L, ldb, C + v * L, ldc, M, K); break;
    default: break;
  }
#else
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < cols; ++c) {
      T sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += (kTransA ? A[k * lda + m] : A[m * lda + k]) * B[k * ldb + c];
      C[m * ldc + c] = sum;
    }
  }
#endif
}

// ---- rows in and out of the scratch ----

// dst[i] = Dst(T(src[i]) * factor), T the scratch's (accumulation) type. Rows of T go in whole
// vectors plus a scalar tail (a plain loop would become a memcpy call, which at 32 floats costs
// more than the copy).
template <typename T, typename Dst, typename Src>
GFM_ALWAYS_INLINE void copy_row(Dst* __restrict dst, const Src* __restrict src, int64_t n, T factor = T(1)) {
  int64_t i = 0;
#if GFM_HAS_VECTOR_EXT
  if constexpr (std::is_same_v<Dst, T> && std::is_same_v<Src, T>) {
    constexpr int64_t L = cpu::Vec<T>::lanes;
    for (; i + L <= n; i += L) cpu::vstore(dst + i, cpu::vload(src + i) * factor);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<Dst>(static_cast<T>(src[i]) * factor);
}

#if GFM_HAS_VECTOR_EXT
// Lane order of step S of a 16 x 16 transpose on the 32 lanes of a pair of rows (a | b): rows i and
// i + S (bit S of i clear) swap their off-diagonal S x S blocks.
typedef int32_t Lanes16 __attribute__((vector_size(64)));
template <int S, bool kHigh>
constexpr Lanes16 swap_order() {
  Lanes16 order{};
  for (int l = 0; l < 16; ++l) order[l] = (l & S) == 0 ? (kHigh ? l + S : l) : (kHigh ? l + 16 : l - S + 16);
  return order;
}

template <int S>
GFM_ALWAYS_INLINE void transpose_step(cpu::Vec<float>::type* r) {
  for (int i = 0; i < 16; ++i) {
    if (i & S) continue;
    const auto a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, swap_order<S, false>());
    r[i + S] = __builtin_shuffle(a, b, swap_order<S, true>());
  }
}
#endif

// dst (cols x rows, row stride ldd) = src (rows x cols, row stride lds)^T, converting. ldd is a
// multiple of 16 and >= rows rounded up to 16 (rows past `rows` get zeros).
template <typename T, typename S>
GFM_ALWAYS_INLINE void transpose_in(const S* __restrict src, int64_t lds, int64_t rows, int64_t cols,
                                    T* __restrict dst, int64_t ldd) {
  int64_t c0 = 0;
#if GFM_HAS_VECTOR_EXT
  if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {  // 16 x 16 blocks in registers
    using V = cpu::Vec<float>::type;
    for (; c0 + 16 <= cols; c0 += 16) {
      for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        V r[16];
        for (int64_t i = 0; i < 16; ++i) r[i] = r0 + i < rows ? cpu::vload(src + (r0 + i) * lds + c0) : V{};
        transpose_step<8>(r);
        transpose_step<4>(r);
        transpose_step<2>(r);
        transpose_step<1>(r);
        for (int64_t i = 0; i < 16; ++i) cpu::vstore(dst + (c0 + i) * ldd + r0, r[i]);
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < cols; ++c) dst[c * ldd + r] = static_cast<T>(src[r * lds + c]);
}

// ---- softmax of one padded row: s[j] <- softmax(s + bias)[j] for j < n, 0 for n <= j < padded ----

#if GFM_HAS_VECTOR_EXT
// exp(x) for 16 floats: Cephes' expf (range reduction to [-ln2/2, ln2/2], degree-6 polynomial,
// 2^n through the exponent bits); ~1 ulp. Inputs below the smallest normal's log give 0, as expf.
GFM_ALWAYS_INLINE cpu::Vec<float>::type vexp(cpu::Vec<float>::type x) {
  using V = cpu::Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(64)));
  const V hi = V{} + 88.3762626647949f, lo = V{} + -87.3365478515625f;
  V xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const V fx = xc * 1.44269504088896341f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(fx, VI), V);  // truncation ...
  n = n > fx ? n - 1.0f : n;                                            // ... made floor
  const V r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  const V result = y * (V)bits;  // a vector cast is a bit cast
  return x < lo ? V{} : result;
}

// Max and sum over the 16 lanes: a tree of 4 shuffles (not 16 lane extractions).
template <bool kMax>
GFM_ALWAYS_INLINE float reduce_lanes(cpu::Vec<float>::type v) {
  using V = cpu::Vec<float>::type;
  const Lanes16 halves = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  const Lanes16 quarters = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
  const Lanes16 pairs = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const Lanes16 neighbours = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  for (const Lanes16& order : {halves, quarters, pairs, neighbours}) {
    const V other = __builtin_shuffle(v, order);
    v = kMax ? (other > v ? other : v) : v + other;
  }
  return v[0];
}
#endif

template <typename T>
GFM_ALWAYS_INLINE void softmax_row(T* __restrict s, const T* __restrict bias, int64_t n, int64_t padded) {
#if GFM_HAS_VECTOR_EXT
  if constexpr (std::is_same_v<T, float>) {
    using V = cpu::Vec<float>::type;
    constexpr int64_t L = cpu::Vec<float>::lanes;
    const V neg_inf = V{} - std::numeric_limits<float>::infinity();
    V lane;
    for (int64_t l = 0; l < L; ++l) lane[l] = static_cast<float>(l);
    V vmax = neg_inf;
    for (int64_t j = 0; j < padded; j += L) {
      V x;
      if (j + L <= n) {
        x = cpu::vload(s + j) + cpu::vload(bias + j);
      } else {  // the last, partial vector: the padding becomes -inf (exp 0)
        float tail[L] = {};
        for (int64_t t = j; t < n; ++t) tail[t - j] = bias[t];
        x = cpu::vload(s + j) + cpu::vload(tail);
        x = lane < static_cast<float>(n - j) ? x : neg_inf;
      }
      cpu::vstore(s + j, x);
      vmax = x > vmax ? x : vmax;
    }
    const float row_max = reduce_lanes<true>(vmax);
    V total = V{};
    for (int64_t j = 0; j < padded; j += L) {
      const V e = vexp(cpu::vload(s + j) - row_max);
      cpu::vstore(s + j, e);
      total += e;
    }
    const float inv = 1.0f / reduce_lanes<false>(total);
    for (int64_t j = 0; j < padded; j += L) cpu::vstore(s + j, cpu::vload(s + j) * inv);
    return;
  }
#endif
  T row_max = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    s[j] += bias[j];
    row_max = std::max(row_max, s[j]);
  }
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - row_max);
    sum += s[j];
  }
  for (int64_t j = 0; j < n; ++j) s[j] /= sum;
  for (int64_t j = n; j < padded; ++j) s[j] = 0;
}

// ---- one (window, head) ----

struct Geometry {
  int64_t windows, tokens, chans, heads, head_dim, groups;
  double scale;
};

// One thread's scratch, rows padded: five (tokens x head_dim) matrices (or their transposes) and
// two (tokens x tokens) ones. Padding columns stay zero.
template <typename T>
struct Scratch {
  int64_t np, dp;  // tokens, head_dim, padded
  std::vector<T> buffer;
  Scratch(int64_t tokens, int64_t head_dim)
      : np(round_up(tokens, kRowPad)), dp(round_up(head_dim, kRowPad)),
        buffer(static_cast<size_t>(5 * np * dp + 2 * np * np), T(0)) {}
  T* thin(int i) { return buffer.data() + i * np * dp; }             // i < 5
  T* square(int i) { return buffer.data() + (5 * dp + i * np) * np; }  // i < 2
};

template <typename scalar_t, typename T>
GFM_ALWAYS_INLINE void forward_task(int64_t task, const Geometry& g, const scalar_t* qkv, const T* bias,
                                    scalar_t* out, scalar_t* probs, Scratch<T>& sc) {
  const int64_t w = task / g.heads, h = task % g.heads, N = g.tokens, D = g.head_dim, C = g.chans;
  const int64_t np = sc.np, dp = sc.dp;
  T *q = sc.thin(0), *kt = sc.thin(1), *v = sc.thin(2), *o = sc.thin(3), *s = sc.square(0);
  const scalar_t* rows = qkv + w * N * 3 * C + h * D;
  for (int64_t i = 0; i < N; ++i) {  // q (N x dp, scaled), v (N x dp)
    copy_row<T>(q + i * dp, rows + i * 3 * C, D, static_cast<T>(g.scale));
    copy_row<T>(v + i * dp, rows + i * 3 * C + 2 * C, D);
  }
  transpose_in(rows + C, 3 * C, N, D, kt, np);  // k^T (D x np)
  gemm<false>(q, dp, kt, np, s, np, N, D, np);  // scores (N x np)
  const T* b = bias + ((w % g.groups) * g.heads + h) * N * N;
  for (int64_t i = 0; i < N; ++i) softmax_row(s + i * np, b + i * N, N, np);
  if (probs != nullptr) copy_row<T>(probs + task * N * np, s, N * np);  // padded rows, as the backward reads them
  gemm<false>(s, np, v, dp, o, dp, N, N, dp);  // out (N x dp)
  for (int64_t i = 0; i < N; ++i) copy_row<T>(out + (w * N + i) * C + h * D, o + i * dp, D);
}

// dv = p^T do; dp = do v^T; ds = p * (dp - rowsum(p * dp)); dq = scale ds k; dk = scale ds^T q.
template <typename scalar_t, typename T>
GFM_ALWAYS_INLINE void backward_task(int64_t task, const Geometry& g, const scalar_t* grad_out, const scalar_t* qkv,
                                     const scalar_t* probs, scalar_t* grad_qkv, T* grad_scores, Scratch<T>& sc) {
  const int64_t w = task / g.heads, h = task % g.heads, N = g.tokens, D = g.head_dim, C = g.chans;
  const int64_t np = sc.np, dp = sc.dp;
  const T scale = static_cast<T>(g.scale);
  T *q = sc.thin(0), *k = sc.thin(1), *vt = sc.thin(2), *dout = sc.thin(3), *result = sc.thin(4);
  T *p = sc.square(0), *ds = sc.square(1);
  const scalar_t* rows = qkv + w * N * 3 * C + h * D;
  for (int64_t i = 0; i < N; ++i) {
    copy_row<T>(q + i * dp, rows + i * 3 * C, D);
    copy_row<T>(k + i * dp, rows + i * 3 * C + C, D);
    copy_row<T>(dout + i * dp, grad_out + (w * N + i) * C + h * D, D);
  }
  transpose_in(rows + 2 * C, 3 * C, N, D, vt, np);
  copy_row<T>(p, probs + task * N * np, N * np);
  scalar_t* grads = grad_qkv + w * N * 3 * C + h * D;  // row i of part (q, k, v) at i * 3C + part * C
  gemm<true>(p, np, dout, dp, result, dp, N, N, dp);   // dv = p^T do
  for (int64_t i = 0; i < N; ++i) copy_row<T>(grads + i * 3 * C + 2 * C, result + i * dp, D);
  gemm<false>(dout, dp, vt, np, ds, np, N, D, np);  // dp = do v^T
  for (int64_t i = 0; i < N; ++i) {
    T* dsi = ds + i * np;
    const T* pi = p + i * np;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < np; ++j) dot += pi[j] * dsi[j];  // the padding of p is 0
#pragma omp simd
    for (int64_t j = 0; j < np; ++j) dsi[j] = pi[j] * (dsi[j] - dot);
    if (grad_scores != nullptr) copy_row<T>(grad_scores + (task * N + i) * N, dsi, N);
  }
  gemm<false>(ds, np, k, dp, result, dp, N, N, dp);  // dq = scale ds k
  for (int64_t i = 0; i < N; ++i) copy_row<T>(grads + i * 3 * C, result + i * dp, D, scale);
  gemm<true>(ds, np, q, dp, result, dp, N, N, dp);  // dk = scale ds^T q
  for (int64_t i = 0; i < N; ++i) copy_row<T>(grads + i * 3 * C + C, result + i * dp, D, scale);
}

// Every task of [begin, end) with one scratch; compiled per ISA (GFM_CPU_CLONES).
#define GFM_DEFINE_FOR(S, T)                                                                                     \
  GFM_CPU_CLONES void forward_tasks(int64_t begin, int64_t end, const Geometry& g, const S* qkv, const T* bias,  \
                                    S* out, S* probs) {                                                          \
    Scratch<T> sc(g.tokens, g.head_dim);                                                                         \
    for (int64_t t = begin; t < end; ++t) forward_task(t, g, qkv, bias, out, probs, sc);                         \
  }                                                                                                              \
  GFM_CPU_CLONES void backward_tasks(int64_t begin, int64_t end, const Geometry& g, const S* grad_out,          \
                                     const S* qkv, const S* probs, S* grad_qkv, T* grad_scores) {                \
    Scratch<T> sc(g.tokens, g.head_dim);                                                                         \
    for (int64_t t = begin; t < end; ++t) backward_task(t, g, grad_out, qkv, probs, grad_qkv, grad_scores, sc);  \
  }
GFM_DEFINE_FOR(float, float)
GFM_DEFINE_FOR(double, double)
GFM_DEFINE_FOR(c10::BFloat16, float)
GFM_DEFINE_FOR(c10::Half, float)
#undef GFM_DEFINE_FOR

Geometry check_qkv(const char* op, const at::Tensor& qkv, int64_t heads, double scale) {
  check_float_input(op, "qkv", qkv, 3);
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0, op, ": qkv (windows, tokens, 3 * channels) must have a ",
              "last dimension divisible by 3 * heads = ", 3 * heads, ", got shape ", qkv.sizes());
  const int64_t chans = qkv.size(2) / 3;
  return Geometry{qkv.size(0), qkv.size(1), chans, heads, chans / heads, 1, scale};
}

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& qkv, const at::Tensor& bias, int64_t heads,
                                                        double scale, bool needs_grad) {
  Geometry g = check_qkv(kForward, qkv, heads, scale);
  TORCH_CHECK(bias.defined() && bias.dim() == 4, kForward, ": bias must have shape (groups, heads, N, N), got ",
              bias.defined() ? bias.sizes() : at::IntArrayRef{});
  TORCH_CHECK(bias.scalar_type() == accumulate_dtype(qkv.scalar_type()), kForward, ": bias must be ",
              accumulate_dtype(qkv.scalar_type()), " for ", qkv.scalar_type(), " qkv, got ", bias.scalar_type());
  TORCH_CHECK(bias.is_contiguous() && bias.device() == qkv.device(), kForward,
              ": bias must be contiguous and on the device of qkv");
  g.groups = bias.size(0);
  check_shape(kForward, "bias", bias, {g.groups, heads, g.tokens, g.tokens});
  TORCH_CHECK(g.groups > 0 && g.windows % g.groups == 0, kForward, ": the windows (", g.windows,
              ") must be a multiple of the bias groups (", g.groups, ")");
  at::Tensor out = at::empty({g.windows, g.tokens, g.chans}, qkv.options());
  const int64_t padded = round_up(g.tokens, kRowPad);
  at::Tensor probs = at::empty(needs_grad ? at::IntArrayRef{g.windows, heads, g.tokens, padded} : at::IntArrayRef{0},
                               qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), kForward, [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = qkv.data_ptr<scalar_t>();
    const acc_t* b = bias.data_ptr<acc_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* p = needs_grad ? probs.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.windows * heads, 1,
                     [&](int64_t begin, int64_t end) { forward_tasks(begin, end, g, x, b, o, p); });
  });
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                                 const at::Tensor& probs, int64_t heads, double scale,
                                                                 bool bias_grad) {
  Geometry g = check_qkv(kBackward, qkv, heads, scale);
  check_input(kBackward, "grad_out", grad_out, qkv, 3);
  check_shape(kBackward, "grad_out", grad_out, {g.windows, g.tokens, g.chans});
  check_input(kBackward, "probs", probs, qkv, 4);
  check_shape(kBackward, "probs", probs, {g.windows, heads, g.tokens, round_up(g.tokens, kRowPad)});
  at::Tensor grad_qkv = at::empty_like(qkv);
  at::Tensor grad_scores =
      at::empty(bias_grad ? at::IntArrayRef{g.windows, heads, g.tokens, g.tokens} : at::IntArrayRef{0},
                qkv.options().dtype(accumulate_dtype(qkv.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), kBackward, [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* x = qkv.data_ptr<scalar_t>();
    const scalar_t* p = probs.data_ptr<scalar_t>();
    scalar_t* gx = grad_qkv.data_ptr<scalar_t>();
    acc_t* gs = bias_grad ? grad_scores.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, g.windows * heads, 1,
                     [&](int64_t begin, int64_t end) { backward_tasks(begin, end, g, go, x, p, gx, gs); });
  });
  return {grad_qkv, grad_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("_window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace gfm_fast
