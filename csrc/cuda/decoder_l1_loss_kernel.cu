// CUDA kernels of decoder_l1_loss: 1x1-conv decoder + PixelShuffle(stride) + masked L1 loss over
// the masked blocks only (see csrc/cpu/decoder_l1_loss_kernel.cpp for the layout argument).
//
// The n masked feature rows are gathered once; cuBLAS computes their logits (n, O); one fused
// kernel compares them with the image pixels read in place from NCHW (channel o = c*s*s + i*s + j
// of block (y, x) is pixel (c, y*s + i, x*s + j), so consecutive threads read consecutive pixels of
// one image row), writes sign(logits - image) over the logits and a per-block partial of the L1 sum;
// cuBLAS then turns the signs into the weight and feature gradients. Finding the masked rows costs
// one device-to-host sync (the GEMM sizes depend on it); the loss and the gradient scaling stay on
// the device, and the backward only multiplies by grad_loss without reading it on the host.
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_utils.cuh"
#include "geometry.h"

namespace gfm_fast {
namespace {

using cuda::acc_type;

constexpr int kThreads = 256;

// Per element e = r * O + o of the (n, O) logits: |logits - pixel| summed per thread block into
// block_sums[blockIdx.x]; when write_sign, logits[e] <- sign(logits - pixel) (0 where equal).
template <typename scalar_t>
__global__ void l1_sign_kernel(scalar_t* __restrict__ logits, const scalar_t* __restrict__ images,
                               const int64_t* __restrict__ rows, int64_t n, DecoderGeometry g, bool write_sign,
                               acc_type<scalar_t>* __restrict__ block_sums) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / cuda::kWarpSize];
  const int64_t O = g.out_chans, s = g.stride, H = g.height(), W = g.width(), total = n * O;
  acc_t sum = 0;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / O, o = e - r * O;
    const int64_t block = rows[r];
    const int64_t b = block / (g.grid_h * g.grid_w), y = (block / g.grid_w) % g.grid_h, x = block % g.grid_w;
    const int64_t c = o / (s * s), i = (o / s) % s, j = o % s;
    const acc_t pixel = static_cast<acc_t>(images[((b * g.chans + c) * H + y * s + i) * W + x * s + j]);
    const acc_t diff = static_cast<acc_t>(logits[e]) - pixel;
    sum += diff < 0 ? -diff : diff;
    if (write_sign) logits[e] = static_cast<scalar_t>(static_cast<acc_t>((diff > 0) - (diff < 0)));
  }
  sum = cuda::block_sum(sum, scratch);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = sum;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> decoder_l1_loss_cuda(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& images,
    const at::Tensor& mask, int64_t stride, bool needs_grad) {
  const DecoderGeometry g = check_decoder_inputs(features, weight, bias, images, mask, stride);
  cuda::check_cuda("decoder_l1_loss", features);
  const c10::cuda::CUDAGuard guard(features.device());
  const auto options = features.options();
  const int64_t D = g.dim, O = g.out_chans;
  const at::Tensor rows = at::nonzero(mask.reshape({-1})).reshape({-1});  // syncs: GEMM sizes depend on it
  const int64_t n = rows.numel();
  const double inv_count = 1.0 / (static_cast<double>(n * g.stride * g.stride) + kRecEps) / g.chans;
  at::Tensor g_features = needs_grad ? at::zeros({g.batch, g.grid_h, g.grid_w, D}, options) : at::empty({0}, options);
  at::Tensor g_weight = needs_grad ? at::zeros({O, D}, options) : at::empty({0}, options);
  at::Tensor g_bias = needs_grad ? at::zeros({O}, options) : at::empty({0}, options);
  if (n == 0) return {at::zeros({}, options), g_features, g_weight, g_bias};  // 0 / eps = 0, gradients 0

  const at::Tensor feats = features.view({g.blocks(), D}).index_select(0, rows);  // (n, D)
  at::Tensor logits = at::addmm(bias, feats, weight.t());                         // (n, O)
  const auto acc_dtype = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t grid = cuda::grid_for(n * O, kThreads);
  at::Tensor block_sums = at::empty({grid}, options.dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "decoder_l1_loss_cuda", [&] {
    l1_sign_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), images.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), n, g, needs_grad,
        block_sums.data_ptr<acc_type<scalar_t>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor loss = block_sums.sum().mul_(inv_count).to(features.scalar_type());
  if (needs_grad) {
    // logits now holds sign(recon - x); d loss / d logits = sign * inv_count.
    at::addmm_out(g_weight, g_weight, logits.t(), feats, /*beta=*/0, /*alpha=*/inv_count);
    at::Tensor g_feats = at::empty({n, D}, options);  // (n, D); the scale inside the GEMM: one rounding
    at::addmm_out(g_feats, g_feats, logits, weight, /*beta=*/0, /*alpha=*/inv_count);
    g_features.view({g.blocks(), D}).index_copy_(0, rows, g_feats);
    g_bias.copy_(logits.sum(0, /*keepdim=*/false, acc_dtype).mul_(inv_count));
  }
  return {loss, g_features, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CUDA, m) {
  m.impl("decoder_l1_loss", &decoder_l1_loss_cuda);
}

}  // namespace gfm_fast
