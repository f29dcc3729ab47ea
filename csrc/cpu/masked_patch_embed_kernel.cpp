// CPU kernels of masked_patch_embed: patchify conv (kernel = stride = p) + LayerNorm + mask-token
// blend, one pass over the tokens.
//
// Work is split by token rows (b, ty). For each row the unmasked tokens' patches are gathered
// straight from the NCHW image into a small (n, C*p*p) buffer (no im2col of the whole image), projected
// with a register-blocked GEMM against the transposed weight, normalised in place and written out;
// masked tokens only copy mask_token. The backward recomputes the projection of the unmasked tokens
// (K = C*p*p = 48 multiply-adds per output, cheaper than saving (B, L, D) activations) and skips the
// masked ones, which only feed g_mask_token.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "geometry.h"
#include "cpu/cpu_utils.h"

namespace gfm_fast {
namespace {

using cpu::acc_type;

constexpr const char* kForward = "masked_patch_embed";
constexpr const char* kBackward = "_masked_patch_embed_backward";
constexpr int64_t kRowBlock = 4;  // tokens sharing each weight load in the GEMM micro-kernels

// ---- hot loops (acc_t = float or double), compiled per ISA ----

// X[r, d] = bias[d] + P[r, :] @ Wt[:, d] for r < rows, d in [d_begin, d_end), one row at a time.
template <typename T>
GFM_ALWAYS_INLINE void project_rows_simple(const T* __restrict P, int64_t rows, int64_t K, const T* __restrict Wt,
                                           const T* __restrict bias, int64_t D, int64_t d_begin, int64_t d_end,
                                           T* __restrict X) {
  for (int64_t r = 0; r < rows; ++r) {
    T* x = X + r * D;
    const T* p = P + r * K;
#pragma omp simd
    for (int64_t d = d_begin; d < d_end; ++d) x[d] = bias[d];
    for (int64_t k = 0; k < K; ++k) {
      const T a = p[k];
      const T* w = Wt + k * D;
#pragma omp simd
      for (int64_t d = d_begin; d < d_end; ++d) x[d] += a * w[d];
    }
  }
}

// X[r, :] = bias + P[r, :] @ Wt for r < rows. P (rows, K), Wt (K, D): the conv weight transposed so
// that output channels are contiguous. Tiles of kRowBlock tokens x one SIMD vector of channels keep
// their accumulators in registers across the whole K loop (K = C*p*p is small: 48 in GFM).
template <typename T>
GFM_ALWAYS_INLINE void project_rows_impl(const T* __restrict P, int64_t rows, int64_t K, const T* __restrict Wt,
                                         const T* __restrict bias, int64_t D, T* __restrict X) {
#if GFM_HAS_VECTOR_EXT
  using V = typename cpu::Vec<T>::type;
  constexpr int64_t L = cpu::Vec<T>::lanes;
  const int64_t d_vec = D - D % L;
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) {
    const T* p = P + r * K;
    T* x = X + r * D;
    for (int64_t d = 0; d < d_vec; d += L) {
      V c0 = cpu::vload(bias + d), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t k = 0; k < K; ++k) {
        const V w = cpu::vload(Wt + k * D + d);
        c0 += p[k] * w;
        c1 += p[K + k] * w;
        c2 += p[2 * K + k] * w;
        c3 += p[3 * K + k] * w;
      }
      cpu::vstore(x + d, c0);
      cpu::vstore(x + D + d, c1);
      cpu::vstore(x + 2 * D + d, c2);
      cpu::vstore(x + 3 * D + d, c3);
    }
    if (d_vec < D) project_rows_simple(p, kRowBlock, K, Wt, bias, D, d_vec, D, x);
  }
  if (r < rows) project_rows_simple(P + r * K, rows - r, K, Wt, bias, D, 0, D, X + r * D);
#else
  project_rows_simple(P, rows, K, Wt, bias, D, 0, D, X);
#endif
}

// Two-pass mean and 1/std of one row (biased variance, as LayerNorm).
template <typename T>
GFM_ALWAYS_INLINE void row_moments(const T* __restrict x, int64_t D, T eps, T& mean, T& rstd) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) sum += x[d];
  mean = sum / static_cast<T>(D);
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < D; ++d) {
    const T c = x[d] - mean;
    sq += c * c;
  }
  rstd = T(1) / std::sqrt(sq / static_cast<T>(D) + eps);
}

// X[r] <- LayerNorm(X[r]) * nw + nb, in place.
template <typename T>
GFM_ALWAYS_INLINE void normalize_rows_impl(T* __restrict X, int64_t rows, int64_t D, const T* __restrict nw,
                                           const T* __restrict nb, T eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T* x = X + r * D;
    T mean, rstd;
    row_moments(x, D, eps, mean, rstd);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) x[d] = (x[d] - mean) * rstd * nw[d] + nb[d];
  }
}

// LayerNorm backward of rows: X holds the pre-norm activations on entry and dL/dX on return;
// G is dL/d(normalised output). Accumulates dL/dnorm_weight and dL/dnorm_bias.
template <typename T>
GFM_ALWAYS_INLINE void norm_backward_rows_impl(T* __restrict X, const T* __restrict G, int64_t rows, int64_t D,
                                               const T* __restrict nw, T eps, T* __restrict g_nw,
                                               T* __restrict g_nb) {
  for (int64_t r = 0; r < rows; ++r) {
    T* x = X + r * D;
    const T* g = G + r * D;
    T mean, rstd;
    row_moments(x, D, eps, mean, rstd);
    T dot_xhat = 0, dot_one = 0;
#pragma omp simd reduction(+ : dot_xhat, dot_one)
    for (int64_t d = 0; d < D; ++d) {
      const T xhat = (x[d] - mean) * rstd;
      const T g_xhat = g[d] * nw[d];
      g_nw[d] += g[d] * xhat;
      g_nb[d] += g[d];
      dot_xhat += g_xhat * xhat;
      dot_one += g_xhat;
    }
    const T c_xhat = dot_xhat / static_cast<T>(D), c_one = dot_one / static_cast<T>(D);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T xhat = (x[d] - mean) * rstd;
      x[d] = rstd * (g[d] * nw[d] - c_one - xhat * c_xhat);
    }
  }
}

// gWt[k, d] += sum_r P[r, k] * GX[r, d] for k in [k_begin, k_end), d in [d_begin, d_end).
template <typename T>
GFM_ALWAYS_INLINE void weight_grad_simple(const T* __restrict P, const T* __restrict GX, int64_t rows, int64_t K,
                                          int64_t D, int64_t k_begin, int64_t k_end, int64_t d_begin, int64_t d_end,
                                          T* __restrict gWt) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = GX + r * D;
    for (int64_t k = k_begin; k < k_end; ++k) {
      const T a = P[r * K + k];
      T* w = gWt + k * D;
#pragma omp simd
      for (int64_t d = d_begin; d < d_end; ++d) w[d] += a * g[d];
    }
  }
}

// gWt (K, D) += P^T @ GX and gb += column sums of GX, for P (rows, K), GX (rows, D). Tiles of
// kRowBlock weight rows x one SIMD vector of channels stay in registers over all the rows.
template <typename T>
GFM_ALWAYS_INLINE void accumulate_weight_grad_impl(const T* __restrict P, const T* __restrict GX, int64_t rows,
                                                   int64_t K, int64_t D, T* __restrict gWt, T* __restrict gb) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = GX + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) gb[d] += g[d];
  }
#if GFM_HAS_VECTOR_EXT
  using V = typename cpu::Vec<T>::type;
  constexpr int64_t L = cpu::Vec<T>::lanes;
  const int64_t d_vec = D - D % L, k_vec = K - K % kRowBlock;
  for (int64_t k = 0; k < k_vec; k += kRowBlock) {
    T* w = gWt + k * D;
    for (int64_t d = 0; d < d_vec; d += L) {
      V c0 = cpu::vload(w + d), c1 = cpu::vload(w + D + d), c2 = cpu::vload(w + 2 * D + d),
        c3 = cpu::vload(w + 3 * D + d);
      for (int64_t r = 0; r < rows; ++r) {
        const V g = cpu::vload(GX + r * D + d);
        const T* p = P + r * K + k;
        c0 += p[0] * g;
        c1 += p[1] * g;
        c2 += p[2] * g;
        c3 += p[3] * g;
      }
      cpu::vstore(w + d, c0);
      cpu::vstore(w + D + d, c1);
      cpu::vstore(w + 2 * D + d, c2);
      cpu::vstore(w + 3 * D + d, c3);
    }
  }
  if (d_vec < D) weight_grad_simple(P, GX, rows, K, D, 0, k_vec, d_vec, D, gWt);
  if (k_vec < K) weight_grad_simple(P, GX, rows, K, D, k_vec, K, 0, D, gWt);
#else
  weight_grad_simple(P, GX, rows, K, D, 0, K, 0, D, gWt);
#endif
}

#define GFM_DEFINE_FOR(T)                                                                                     \
  GFM_CPU_CLONES void project_rows(const T* P, int64_t rows, int64_t K, const T* Wt, const T* bias, int64_t D, \
                                   T* X) {                                                                    \
    project_rows_impl(P, rows, K, Wt, bias, D, X);                                                            \
  }                                                                                                           \
  GFM_CPU_CLONES void normalize_rows(T* X, int64_t rows, int64_t D, const T* nw, const T* nb, T eps) {        \
    normalize_rows_impl(X, rows, D, nw, nb, eps);                                                             \
  }                                                                                                           \
  GFM_CPU_CLONES void norm_backward_rows(T* X, const T* G, int64_t rows, int64_t D, const T* nw, T eps,       \
                                         T* g_nw, T* g_nb) {                                                  \
    norm_backward_rows_impl(X, G, rows, D, nw, eps, g_nw, g_nb);                                              \
  }                                                                                                           \
  GFM_CPU_CLONES void accumulate_weight_grad(const T* P, const T* GX, int64_t rows, int64_t K, int64_t D,      \
                                             T* gWt, T* gb) {                                                 \
    accumulate_weight_grad_impl(P, GX, rows, K, D, gWt, gb);                                                  \
  }
GFM_DEFINE_FOR(float)
GFM_DEFINE_FOR(double)
#undef GFM_DEFINE_FOR

// ---- per token row ----

// Patches of the tokens `cols` of token row ty, as rows of P (n, C*p*p) in the (c, ky, kx) order of
// the flattened conv weight, read straight from the NCHW image (C, H, W).
template <typename scalar_t, typename acc_t>
void gather_patches(const scalar_t* image, const PatchGeometry& g, int64_t ty, const int64_t* cols, int64_t n,
                    acc_t* P) {
  const int64_t p = g.patch;
  for (int64_t c = 0; c < g.chans; ++c) {
    for (int64_t ky = 0; ky < p; ++ky) {
      const scalar_t* src = image + (c * g.height + ty * p + ky) * g.width;
      const int64_t k0 = (c * p + ky) * p;
      for (int64_t t = 0; t < n; ++t) cpu::load_row(P + t * g.kdim + k0, src + cols[t] * p, p);
    }
  }
}

// Splits token row ty of image b into masked tokens (handed to on_masked(tx)) and unmasked ones
// (their columns, returned in cols). The mask cell of token (ty, tx) is (ty / rep_h, tx / rep_w).
template <typename OnMasked>
int64_t split_row(const float* mask_b, const PatchGeometry& g, int64_t ty, int64_t* cols, OnMasked on_masked) {
  const float* mask_row = mask_b + (ty / g.rep_h()) * g.mask_w;
  const int64_t rep_w = g.rep_w();
  int64_t n = 0;
  for (int64_t tx = 0; tx < g.grid_w; ++tx) {
    if (mask_row[tx / rep_w] != 0.f) {
      on_masked(tx);
    } else {
      cols[n++] = tx;
    }
  }
  return n;
}

// Parameters as acc_t vectors; the weight transposed to (K, D).
template <typename acc_t>
struct AccParams {
  at::Tensor weight_t, bias, norm_weight, norm_bias;
  AccParams(const at::Tensor& weight, const at::Tensor& b, const at::Tensor& nw, const at::Tensor& nb)
      : weight_t(cpu::to_acc<acc_t>(weight).t().contiguous()),
        bias(cpu::to_acc<acc_t>(b)),
        norm_weight(cpu::to_acc<acc_t>(nw)),
        norm_bias(nb.defined() ? cpu::to_acc<acc_t>(nb) : at::Tensor()) {}
};

template <typename scalar_t>
void forward_kernel(const at::Tensor& images, const AccParams<acc_type<scalar_t>>& params, const at::Tensor& mask,
                    const at::Tensor& mask_token, const PatchGeometry& g, double eps, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* img = images.data_ptr<scalar_t>();
  const scalar_t* token = mask_token.data_ptr<scalar_t>();
  const float* mask_ptr = mask.data_ptr<float>();
  const acc_t* Wt = params.weight_t.template data_ptr<acc_t>();
  const acc_t* bias = params.bias.template data_ptr<acc_t>();
  const acc_t* nw = params.norm_weight.template data_ptr<acc_t>();
  const acc_t* nb = params.norm_bias.template data_ptr<acc_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t D = g.dim, K = g.kdim, image_numel = g.chans * g.height * g.width;

  at::parallel_for(0, g.batch * g.grid_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> P(g.grid_w * K), X(g.grid_w * D);
    std::vector<int64_t> cols(g.grid_w);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.grid_h, ty = row % g.grid_h;
      scalar_t* out_row = out_ptr + (b * g.tokens() + ty * g.grid_w) * D;
      // Masked tokens are exactly mask_token: x * (1 - 1) + mask_token * 1.
      const int64_t n = split_row(mask_ptr + b * g.mask_h * g.mask_w, g, ty, cols.data(), [&](int64_t tx) {
        cpu::stream_row(out_row + tx * D, token, D * sizeof(scalar_t));
      });
      if (n == 0) continue;
      gather_patches(img + b * image_numel, g, ty, cols.data(), n, P.data());
      project_rows(P.data(), n, K, Wt, bias, D, X.data());
      normalize_rows(X.data(), n, D, nw, nb, static_cast<acc_t>(eps));
      for (int64_t t = 0; t < n; ++t) {
        scalar_t* dst = out_row + cols[t] * D;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          cpu::stream_row(dst, X.data() + t * D, D * sizeof(scalar_t));
        } else {
          cpu::store_row(dst, X.data() + t * D, D);
        }
      }
    }
    cpu::stream_fence();
  });
}

template <typename scalar_t>
PatchEmbedGrads backward_kernel(
    const at::Tensor& grad_out, const at::Tensor& images, const AccParams<acc_type<scalar_t>>& params,
    const at::Tensor& mask, const PatchGeometry& g, double eps) {
  using acc_t = acc_type<scalar_t>;
  const int64_t D = g.dim, K = g.kdim, image_numel = g.chans * g.height * g.width;
  const scalar_t* grad = grad_out.data_ptr<scalar_t>();
  const scalar_t* img = images.data_ptr<scalar_t>();
  const float* mask_ptr = mask.data_ptr<float>();
  const acc_t* Wt = params.weight_t.template data_ptr<acc_t>();
  const acc_t* bias = params.bias.template data_ptr<acc_t>();
  const acc_t* nw = params.norm_weight.template data_ptr<acc_t>();
  // Per thread: g_weight^T (K, D), then g_bias, g_norm_weight, g_norm_bias, g_mask_token (D each).
  cpu::ThreadPartials<acc_t> partials(K * D + 4 * D);

  at::parallel_for(0, g.batch * g.grid_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> P(g.grid_w * K), X(g.grid_w * D), G(g.grid_w * D);
    std::vector<int64_t> cols(g.grid_w);
    acc_t* g_wt = partials.mine();
    acc_t* g_bias = g_wt + K * D;
    acc_t* g_nw = g_bias + D;
    acc_t* g_nb = g_nw + D;
    acc_t* g_token = g_nb + D;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.grid_h, ty = row % g.grid_h;
      const scalar_t* grad_row = grad + (b * g.tokens() + ty * g.grid_w) * D;
      // Masked tokens only reach mask_token; unmasked ones go through the norm and the conv.
      const int64_t n = split_row(mask_ptr + b * g.mask_h * g.mask_w, g, ty, cols.data(), [&](int64_t tx) {
        const scalar_t* src = grad_row + tx * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) g_token[d] += static_cast<acc_t>(src[d]);
      });
      if (n == 0) continue;
      for (int64_t t = 0; t < n; ++t) cpu::load_row(G.data() + t * D, grad_row + cols[t] * D, D);
      gather_patches(img + b * image_numel, g, ty, cols.data(), n, P.data());
      project_rows(P.data(), n, K, Wt, bias, D, X.data());
      norm_backward_rows(X.data(), G.data(), n, D, nw, static_cast<acc_t>(eps), g_nw, g_nb);
      accumulate_weight_grad(P.data(), X.data(), n, K, D, g_wt, g_bias);
    }
  });

  const at::Tensor sums = partials.reduce();
  const auto dtype = grad_out.scalar_type();
  // Fresh tensors (copy=true): the outputs must not share the partials' storage.
  at::Tensor g_weight = sums.narrow(0, 0, K * D).view({K, D}).t().to(dtype, false, true).contiguous();  // (D, K)
  auto vec = [&](int64_t i) { return sums.narrow(0, K * D + i * D, D).to(dtype, false, true); };
  return {g_weight, vec(0), vec(1), vec(2), vec(3)};
}

at::Tensor masked_patch_embed_cpu(const at::Tensor& images, const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& mask,
                                  const at::Tensor& mask_token, int64_t patch_size, double eps) {
  const PatchGeometry g = check_patch_embed_forward_inputs(kForward, images, weight, bias, norm_weight, norm_bias,
                                                           mask, mask_token, patch_size);
  at::Tensor out = at::empty({g.batch, g.tokens(), g.dim}, images.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "masked_patch_embed_cpu", [&] {
    const AccParams<acc_type<scalar_t>> params(weight, bias, norm_weight, norm_bias);
    forward_kernel<scalar_t>(images, params, mask, mask_token, g, eps, out);
  });
  return out;
}

PatchEmbedGrads masked_patch_embed_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& norm_weight, const at::Tensor& mask, int64_t patch_size, double eps) {
  const PatchGeometry g =
      check_patch_embed_backward_inputs(kBackward, grad_out, images, weight, bias, norm_weight, mask, patch_size);
  PatchEmbedGrads grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "masked_patch_embed_backward_cpu",
                                  [&] {
                                    const AccParams<acc_type<scalar_t>> params(weight, bias, norm_weight,
                                                                               at::Tensor());
                                    grads = backward_kernel<scalar_t>(grad_out, images, params, mask, g, eps);
                                  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CPU, m) {
  m.impl("masked_patch_embed", &masked_patch_embed_cpu);
  m.impl("_masked_patch_embed_backward", &masked_patch_embed_backward_cpu);
}

}  // namespace gfm_fast
