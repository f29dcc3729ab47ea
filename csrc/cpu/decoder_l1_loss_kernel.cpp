// CPU kernels of decoder_l1_loss: GFM's 1x1-conv decoder + PixelShuffle(stride) + masked L1 loss,
// computed for the masked blocks only.
//
// The decoder stride equals the mask block, so decoder output row (b, y, x) is exactly mask block
// (b, y, x): only the n masked rows of the NHWC features are gathered (22 of 36 per image in GFM)
// and go through the GEMMs. Their logits are produced a slice of output channels at a time (a few
// image rows of every masked block, small enough to stay in cache) and compared at once with the
// image pixels, read in place from NCHW: channel o = c*s*s + i*s + j of block (y, x) is pixel
// (c, y*s + i, x*s + j), so each run of s channels is one contiguous image row segment. The
// comparison overwrites the slice with sign(logits - image) and the same slice then feeds the two
// gradient GEMMs (Liger's fused-linear-loss idiom): the full-resolution reconstruction, the
// upsampled mask, the per-pixel loss and even the full logits matrix never exist.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "geometry.h"
#include "cpu/cpu_utils.h"

namespace gfm_fast {
namespace {

using cpu::acc_type;

constexpr const char* kForward = "decoder_l1_loss";
// Target logits slice size (elements): ~2 MiB of fp32, each thread's half in its L2 between the GEMM
// that writes it, the L1 pass and the GEMMs that read it back. Fewer, larger slices mean fewer
// parallel regions (each one a barrier of all threads).
constexpr int64_t kSliceElems = 512 * 1024;

// Indices (into the B*h*w feature rows) of the masked blocks, in order.
at::Tensor masked_rows(const at::Tensor& mask) {
  const float* m = mask.data_ptr<float>();
  std::vector<int64_t> rows;
  rows.reserve(mask.numel());
  for (int64_t i = 0; i < mask.numel(); ++i) {
    if (m[i] != 0.f) rows.push_back(i);
  }
  return at::tensor(rows, at::TensorOptions().dtype(at::kLong));
}

// Sum of |l - x| over one run, and l <- sign(l - x) when write_sign (torch.sign: 0 at l == x).
template <typename scalar_t, typename acc_t>
GFM_ALWAYS_INLINE acc_t l1_run(scalar_t* __restrict logits, const scalar_t* __restrict pixels, int64_t len,
                               bool write_sign, acc_t* __restrict sign_sums) {
  acc_t sum = 0;
  if (write_sign) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      const acc_t diff = static_cast<acc_t>(logits[j]) - static_cast<acc_t>(pixels[j]);
      const acc_t sign = static_cast<acc_t>((diff > 0) - (diff < 0));
      sum += std::abs(diff);
      logits[j] = static_cast<scalar_t>(sign);
      sign_sums[j] += sign;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) sum += std::abs(static_cast<acc_t>(logits[j]) - static_cast<acc_t>(pixels[j]));
  }
  return sum;
}

// Turns the n gradient rows compacted at the front of `dense` (total_rows x dim) into the dense
// layout: compacted row r moves to row rows[r], every other row becomes 0. The masked gradients are
// computed straight into the front of g_features, so no separate (n, D) buffer exists. rows is
// increasing, so rows[r] >= r: walking from the last row down, a move or a zero fill only touches
// rows above every row not yet moved.
template <typename scalar_t>
void spread_rows_in_place(scalar_t* dense, int64_t total_rows, int64_t dim, const int64_t* rows, int64_t n) {
  int64_t filled_from = total_rows;  // rows [filled_from, total_rows) hold their final values
  for (int64_t r = n - 1; r >= 0; --r) {
    const int64_t dst = rows[r];
    std::fill(dense + (dst + 1) * dim, dense + filled_from * dim, scalar_t(0));
    if (dst != r) std::copy(dense + r * dim, dense + (r + 1) * dim, dense + dst * dim);  // dst > r: disjoint
    filled_from = dst;
  }
  std::fill(dense, dense + filled_from * dim, scalar_t(0));
}

// L1 pass over one logits slice (n masked rows x channels [o0, o0 + width)), both multiples of
// stride: returns sum |logits - image| and, when write_sign, turns the slice into signs and adds
// their column sums (for g_bias) to the caller's per-thread partials.
template <typename scalar_t>
double l1_slice(scalar_t* slice, int64_t o0, int64_t width, const int64_t* rows, int64_t n, const scalar_t* images,
                const DecoderGeometry& g, bool write_sign, cpu::ThreadPartials<acc_type<scalar_t>>* sign_sums) {
  using acc_t = acc_type<scalar_t>;
  const int64_t s = g.stride, H = g.height(), W = g.width();
  cpu::ThreadPartials<double> loss_sums(1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    acc_t* col_sums = write_sign ? sign_sums->mine() + o0 : nullptr;
    double total = 0;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t block = rows[r];
      const int64_t b = block / (g.grid_h * g.grid_w), y = (block / g.grid_w) % g.grid_h, x = block % g.grid_w;
      scalar_t* logits = slice + r * width;
      for (int64_t q = 0; q < width; q += s) {
        const int64_t image_row = (o0 + q) / s;  // c * s + i
        const int64_t c = image_row / s, i = image_row % s;
        const scalar_t* pixels = images + ((b * g.chans + c) * H + y * s + i) * W + x * s;
        total += l1_run<scalar_t, acc_t>(logits + q, pixels, s, write_sign, write_sign ? col_sums + q : nullptr);
      }
    }
    *loss_sums.mine() += total;
  });
  return loss_sums.reduce().item<double>();
}

// Channels per slice: a multiple of stride (whole image row segments), slices of about equal size.
// fp16/bf16 use a single slice: their GEMMs return 16-bit results, so g_features must come out of
// one GEMM rather than a sum of rounded partial products.
int64_t slice_width(const DecoderGeometry& g, int64_t n, at::ScalarType dtype) {
  if (dtype == at::kHalf || dtype == at::kBFloat16) return g.out_chans;
  const int64_t slices = std::max<int64_t>(1, (n * g.out_chans + kSliceElems - 1) / kSliceElems);
  const int64_t runs = g.out_chans / g.stride;  // image row segments (c, i)
  return ((runs + slices - 1) / slices) * g.stride;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> decoder_l1_loss_cpu(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& images,
    const at::Tensor& mask, int64_t stride, bool needs_grad) {
  const DecoderGeometry g = check_decoder_inputs(features, weight, bias, images, mask, stride);
  const auto options = features.options();
  const at::Tensor rows = masked_rows(mask);
  const int64_t n = rows.numel(), D = g.dim, O = g.out_chans;
  // loss = sum |x - recon| over masked pixel-channels / (sum(M) + eps) / C, sum(M) = n * s * s.
  const double inv_count = 1.0 / (static_cast<double>(n * g.stride * g.stride) + kRecEps) / g.chans;
  at::Tensor g_features = needs_grad ? at::empty({g.batch, g.grid_h, g.grid_w, D}, options) : at::empty({0}, options);
  at::Tensor g_weight = needs_grad ? at::empty({O, D}, options) : at::empty({0}, options);
  at::Tensor g_bias = needs_grad ? at::zeros({O}, options) : at::empty({0}, options);
  if (n == 0) {  // nothing masked: loss 0 (0 / eps), gradients 0
    if (needs_grad) {
      g_features.zero_();
      g_weight.zero_();
    }
    return {at::zeros({}, options), g_features, g_weight, g_bias};
  }

  double abs_sum = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "decoder_l1_loss_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor feats = features.view({g.blocks(), D}).index_select(0, rows);  // (n, D)
    const int64_t width = slice_width(g, n, features.scalar_type());
    at::Tensor slice_buffer = at::empty({n * width}, options);
    // The masked rows' feature gradients, compacted at the front of g_features until the end.
    at::Tensor g_feats = needs_grad ? g_features.view({g.blocks(), D}).narrow(0, 0, n) : at::Tensor();
    std::unique_ptr<cpu::ThreadPartials<acc_t>> sign_sums;
    if (needs_grad) sign_sums = std::make_unique<cpu::ThreadPartials<acc_t>>(O);
    for (int64_t o0 = 0; o0 < O; o0 += width) {
      const int64_t cols = std::min(width, O - o0);
      at::Tensor slice = slice_buffer.narrow(0, 0, n * cols).view({n, cols});
      const at::Tensor w_slice = weight.narrow(0, o0, cols);  // (cols, D)
      at::addmm_out(slice, bias.narrow(0, o0, cols), feats, w_slice.t());
      abs_sum += l1_slice<scalar_t>(slice.data_ptr<scalar_t>(), o0, cols, rows.data_ptr<int64_t>(), n,
                                    images.data_ptr<scalar_t>(), g, needs_grad, sign_sums.get());
      if (!needs_grad) continue;
      // slice now holds sign(recon - x); d loss / d logits = sign * inv_count.
      at::Tensor g_w_slice = g_weight.narrow(0, o0, cols);
      at::addmm_out(g_w_slice, g_w_slice, slice.t(), feats, /*beta=*/0, /*alpha=*/inv_count);
      at::addmm_out(g_feats, g_feats, slice, w_slice, /*beta=*/o0 == 0 ? 0 : 1, /*alpha=*/inv_count);
    }
    if (needs_grad) {
      spread_rows_in_place(g_features.data_ptr<scalar_t>(), g.blocks(), D, rows.data_ptr<int64_t>(), n);
      g_bias.copy_(sign_sums->reduce().mul_(inv_count));
    }
  });
  return {at::scalar_tensor(abs_sum * inv_count, options), g_features, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CPU, m) {
  m.impl("decoder_l1_loss", &decoder_l1_loss_cpu);
}

}  // namespace gfm_fast
