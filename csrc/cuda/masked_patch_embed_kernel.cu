// CUDA kernels of masked_patch_embed: patchify conv + LayerNorm + mask-token blend.
//
// One warp per token (grid-stride). A masked token only copies mask_token. An unmasked one loads
// its C*p*p patch straight from the NCHW image into shared memory, projects it with the transposed
// weight (lanes own output channels d = lane, lane + 32, ...: coalesced weight reads), normalises with
// warp reductions and writes its row. The backward recomputes the projection of the unmasked
// tokens, accumulates g_norm_weight, g_norm_bias, g_bias and g_mask_token per warp in shared memory
// (each lane owns its channels, so no atomics), adds the warps' sums and then the blocks' in a fixed
// order (bitwise deterministic on a given GPU), writes dL/dx per token, and gets g_weight from one
// batched cuBLAS GEMM of dL/dx with the image patches.
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_utils.cuh"
#include "geometry.h"

namespace gfm_fast {
namespace {

using cuda::acc_type;

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * cuda::kWarpSize;
constexpr int kSums = 4;  // backward partial sums: g_norm_weight, g_norm_bias, g_bias, g_mask_token
constexpr const char* kForward = "masked_patch_embed";
constexpr const char* kBackward = "_masked_patch_embed_backward";

// Token t = (b, ty, tx) and whether its mask cell (ty / rep_h, tx / rep_w) is set.
struct Token {
  int64_t b, ty, tx;
  bool masked;
};

__device__ __forceinline__ Token locate(int64_t t, const float* __restrict__ mask, const PatchGeometry& g) {
  Token tok;
  const int64_t L = g.tokens();
  tok.b = t / L;
  const int64_t l = t - tok.b * L;
  tok.ty = l / g.grid_w;
  tok.tx = l - tok.ty * g.grid_w;
  tok.masked = mask[(tok.b * g.mask_h + tok.ty / g.rep_h()) * g.mask_w + tok.tx / g.rep_w()] != 0.f;
  return tok;
}

// The warp loads the token's patch (K values in the (c, ky, kx) order of the flattened conv weight)
// into `patch`, then each lane computes x[d] = bias[d] + patch . Wt[:, d] for its channels.
// Returns the mean of x over D (every lane gets it).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t project_token(const scalar_t* __restrict__ images, const Token& tok,
                                               const PatchGeometry& g, const acc_t* __restrict__ wt,
                                               const acc_t* __restrict__ bias, acc_t* patch, acc_t* x, int lane) {
  const int64_t p = g.patch, pp = p * p, K = g.kdim, D = g.dim;
  for (int64_t k = lane; k < K; k += cuda::kWarpSize) {
    const int64_t c = k / pp, ky = (k / p) % p, kx = k % p;
    patch[k] = static_cast<acc_t>(
        images[((tok.b * g.chans + c) * g.height + tok.ty * p + ky) * g.width + tok.tx * p + kx]);
  }
  __syncwarp();
  acc_t sum = 0;
  for (int64_t d = lane; d < D; d += cuda::kWarpSize) {
    acc_t v = bias[d];
    for (int64_t k = 0; k < K; ++k) v += patch[k] * wt[k * D + d];
    x[d] = v;
    sum += v;
  }
  return cuda::warp_sum(sum) / static_cast<acc_t>(D);
}

// 1 / sqrt(var + eps) of the lane-owned x (two-pass, biased variance like LayerNorm).
template <typename acc_t>
__device__ __forceinline__ acc_t token_rstd(const acc_t* x, acc_t mean, int64_t D, acc_t eps, int lane) {
  acc_t sq = 0;
  for (int64_t d = lane; d < D; d += cuda::kWarpSize) {
    const acc_t c = x[d] - mean;
    sq += c * c;
  }
  return acc_t(1) / ::sqrt(cuda::warp_sum(sq) / static_cast<acc_t>(D) + eps);
}

template <typename scalar_t>
__global__ void embed_forward_kernel(const scalar_t* __restrict__ images, const acc_type<scalar_t>* __restrict__ wt,
                                     const acc_type<scalar_t>* __restrict__ bias,
                                     const acc_type<scalar_t>* __restrict__ norm_weight,
                                     const acc_type<scalar_t>* __restrict__ norm_bias, const float* __restrict__ mask,
                                     const scalar_t* __restrict__ mask_token, PatchGeometry g,
                                     acc_type<scalar_t> eps, scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  const int lane = threadIdx.x % cuda::kWarpSize, warp = threadIdx.x / cuda::kWarpSize;
  const int64_t K = g.kdim, D = g.dim, num_tokens = g.batch * g.tokens();
  acc_t* patch = reinterpret_cast<acc_t*>(smem_bytes) + warp * (K + D);
  acc_t* x = patch + K;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const Token tok = locate(t, mask, g);  // warp-uniform
    scalar_t* o = out + t * D;
    if (tok.masked) {  // x * (1 - 1) + mask_token * 1
      for (int64_t d = lane; d < D; d += cuda::kWarpSize) o[d] = mask_token[d];
      continue;
    }
    const acc_t mean = project_token(images, tok, g, wt, bias, patch, x, lane);
    const acc_t rstd = token_rstd(x, mean, D, eps, lane);
    for (int64_t d = lane; d < D; d += cuda::kWarpSize) {
      o[d] = static_cast<scalar_t>((x[d] - mean) * rstd * norm_weight[d] + norm_bias[d]);
    }
    __syncwarp();  // the next token rewrites patch
  }
}

template <typename scalar_t>
__global__ void embed_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ images,
                                      const acc_type<scalar_t>* __restrict__ wt,
                                      const acc_type<scalar_t>* __restrict__ bias,
                                      const acc_type<scalar_t>* __restrict__ norm_weight,
                                      const float* __restrict__ mask, PatchGeometry g, acc_type<scalar_t> eps,
                                      acc_type<scalar_t>* __restrict__ grad_x,
                                      acc_type<scalar_t>* __restrict__ block_partials) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  const int lane = threadIdx.x % cuda::kWarpSize, warp = threadIdx.x / cuda::kWarpSize;
  const int64_t K = g.kdim, D = g.dim, num_tokens = g.batch * g.tokens();
  // Per-warp sums (kWarpsPerBlock, kSums, D): lane l only touches channels d = l, l + 32, ..., so
  // plain adds replace shared-memory atomics, whose order (and fp rounding) varies run to run.
  acc_t* all_sums = reinterpret_cast<acc_t*>(smem_bytes);
  acc_t* sums = all_sums + warp * kSums * D;
  acc_t* s_norm_weight = sums;
  acc_t* s_norm_bias = sums + D;
  acc_t* s_bias = sums + 2 * D;
  acc_t* s_token = sums + 3 * D;
  acc_t* patch = all_sums + kWarpsPerBlock * kSums * D + warp * (K + D);
  acc_t* x = patch + K;
  for (int64_t i = threadIdx.x; i < kWarpsPerBlock * kSums * D; i += blockDim.x) all_sums[i] = 0;
  __syncthreads();
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const Token tok = locate(t, mask, g);  // warp-uniform
    const scalar_t* grad = grad_out + t * D;
    acc_t* gx = grad_x + t * D;
    if (tok.masked) {  // only mask_token sees this token's gradient
      for (int64_t d = lane; d < D; d += cuda::kWarpSize) {
        s_token[d] += static_cast<acc_t>(grad[d]);
        gx[d] = 0;
      }
      continue;
    }
    const acc_t mean = project_token(images, tok, g, wt, bias, patch, x, lane);
    const acc_t rstd = token_rstd(x, mean, D, eps, lane);
    acc_t dot_xhat = 0, dot_one = 0;
    for (int64_t d = lane; d < D; d += cuda::kWarpSize) {
      const acc_t xhat = (x[d] - mean) * rstd, gy = static_cast<acc_t>(grad[d]);
      const acc_t g_xhat = gy * norm_weight[d];
      x[d] = xhat;
      s_norm_weight[d] += gy * xhat;
      s_norm_bias[d] += gy;
      dot_xhat += g_xhat * xhat;
      dot_one += g_xhat;
    }
    const acc_t c_xhat = cuda::warp_sum(dot_xhat) / static_cast<acc_t>(D);
    const acc_t c_one = cuda::warp_sum(dot_one) / static_cast<acc_t>(D);
    for (int64_t d = lane; d < D; d += cuda::kWarpSize) {
      const acc_t value = rstd * (static_cast<acc_t>(grad[d]) * norm_weight[d] - c_one - x[d] * c_xhat);
      gx[d] = value;
      s_bias[d] += value;
    }
    __syncwarp();  // the next token rewrites patch
  }
  __syncthreads();
  acc_t* partial = block_partials + static_cast<int64_t>(blockIdx.x) * kSums * D;
  for (int64_t i = threadIdx.x; i < kSums * D; i += blockDim.x) {
    acc_t total = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) total += all_sums[w * kSums * D + i];
    partial[i] = total;
  }
}

// Dynamic shared memory of a launch; raises the kernel's limit above the 48 KiB default when needed.
template <typename Kernel>
size_t prepare_shared_memory(Kernel kernel, size_t bytes, const char* op) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes <= props->sharedMemPerBlockOptin, op, ": embedding width and patch size need ", bytes,
              " bytes of shared memory per block, more than the device's ", props->sharedMemPerBlockOptin,
              "; use backend='triton' or 'reference' for such shapes");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return bytes;
}

at::Tensor to_acc(const at::Tensor& t) { return t.to(t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat); }

at::Tensor masked_patch_embed_cuda(const at::Tensor& images, const at::Tensor& weight, const at::Tensor& bias,
                                   const at::Tensor& norm_weight, const at::Tensor& norm_bias, const at::Tensor& mask,
                                   const at::Tensor& mask_token, int64_t patch_size, double eps) {
  const PatchGeometry g = check_patch_embed_forward_inputs(kForward, images, weight, bias, norm_weight, norm_bias,
                                                           mask, mask_token, patch_size);
  cuda::check_cuda(kForward, images);
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor out = at::empty({g.batch, g.tokens(), g.dim}, images.options());
  const int64_t num_tokens = g.batch * g.tokens();
  if (num_tokens == 0) return out;
  const at::Tensor wt = to_acc(weight).t().contiguous();  // (K, D)
  const at::Tensor b = to_acc(bias), nw = to_acc(norm_weight), nb = to_acc(norm_bias);
  const int64_t grid = cuda::grid_for(num_tokens, kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "masked_patch_embed_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const size_t smem = prepare_shared_memory(embed_forward_kernel<scalar_t>,
                                              kWarpsPerBlock * (g.kdim + g.dim) * sizeof(acc_t), kForward);
    embed_forward_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        images.data_ptr<scalar_t>(), wt.data_ptr<acc_t>(), b.data_ptr<acc_t>(), nw.data_ptr<acc_t>(),
        nb.data_ptr<acc_t>(), mask.data_ptr<float>(), mask_token.data_ptr<scalar_t>(), g, static_cast<acc_t>(eps),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

PatchEmbedGrads masked_patch_embed_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& norm_weight, const at::Tensor& mask, int64_t patch_size, double eps) {
  const PatchGeometry g =
      check_patch_embed_backward_inputs(kBackward, grad_out, images, weight, bias, norm_weight, mask, patch_size);
  cuda::check_cuda(kBackward, images);
  const c10::cuda::CUDAGuard guard(images.device());
  const auto dtype = images.scalar_type();
  const int64_t D = g.dim, num_tokens = g.batch * g.tokens();
  const at::Tensor wt = to_acc(weight).t().contiguous();  // (K, D)
  const at::Tensor b = to_acc(bias), nw = to_acc(norm_weight);
  const auto acc_options = wt.options();
  const int64_t grid = cuda::grid_for(std::max<int64_t>(num_tokens, 1), kWarpsPerBlock);
  at::Tensor grad_x = at::empty({num_tokens, D}, acc_options);  // dL/d(conv output), 0 on masked tokens
  at::Tensor partials = at::empty({grid, kSums * D}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "masked_patch_embed_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const size_t smem = prepare_shared_memory(embed_backward_kernel<scalar_t>,
                                              kWarpsPerBlock * (kSums * D + g.kdim + D) * sizeof(acc_t), kBackward);
    embed_backward_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        grad_out.data_ptr<scalar_t>(), images.data_ptr<scalar_t>(), wt.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
        nw.data_ptr<acc_t>(), mask.data_ptr<float>(), g, static_cast<acc_t>(eps), grad_x.data_ptr<acc_t>(),
        partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor sums = partials.sum(0);  // (kSums * D), fixed reduction order
  // g_weight[d, (c, ky, kx)] = sum over tokens of dL/dx[token, d] * patch[token, (c, ky, kx)].
  const at::Tensor patches = at::im2col(to_acc(images), {g.patch, g.patch}, {1, 1}, {0, 0}, {g.patch, g.patch});
  const at::Tensor g_weight =
      at::bmm(grad_x.view({g.batch, g.tokens(), D}).transpose(1, 2), patches.transpose(1, 2)).sum(0);  // (D, K)
  auto part = [&](int64_t i) { return sums.narrow(0, i * D, D).to(dtype, false, true); };
  return {g_weight.to(dtype, false, true), part(2), part(0), part(1), part(3)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CUDA, m) {
  m.impl("masked_patch_embed", &masked_patch_embed_cuda);
  m.impl("_masked_patch_embed_backward", &masked_patch_embed_backward_cuda);
}

}  // namespace gfm_fast
