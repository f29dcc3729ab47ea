// CPU kernels of widened_linear: a bf16 linear layer computed by the fp32 GEMM, for CPUs without bf16
// multiply instructions, where torch's bf16 GEMM is emulated ~5x slower than its fp32 one.
//
// bf16 operands widen to fp32 exactly, and the product of two bf16 numbers is exact in fp32, so the
// fp32 GEMM on widened operands computes what a bf16 GEMM does (fp32 sums of exact products). These
// kernels do the conversions around at::mm in as few passes as possible: the forward rounds the input
// to bf16 (kept for the backward) and widens it in one pass, and adds the bias while rounding the
// GEMM's result to bf16; the backward widens the output gradient and sums it for the bias gradient
// in one pass.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace gfm_fast {
namespace {

using BF16 = c10::BFloat16;

constexpr const char* kForward = "widened_linear";
constexpr const char* kBackward = "_widened_linear_backward";
constexpr const char* kRound = "round_to_bf16";

// Rows per parallel task: about 16k elements, enough to amortise the task.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// rounded[i] = bf16(src[i]) (round to nearest even) and widened[i] = float(rounded[i]), in one pass.
GFM_CPU_CLONES void round_and_widen(const float* __restrict src, BF16* __restrict rounded, float* __restrict widened,
                                    int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const BF16 r = static_cast<BF16>(src[i]);
    rounded[i] = r;
    widened[i] = static_cast<float>(r);
  }
}

// dst[i] = float(bf16(src[i])): src's values rounded to bf16, kept in fp32.
GFM_CPU_CLONES void round_in_fp32(const float* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(static_cast<BF16>(src[i]));
}

GFM_CPU_CLONES void widen(const BF16* __restrict src, float* __restrict dst, int64_t n) {
  cpu::load_row(dst, src, n);
}

// dst[i] = bf16(src[i] + bias[i]) over one row (bias may be null).
GFM_CPU_CLONES void add_bias_and_round(const float* __restrict src, const float* __restrict bias, BF16* __restrict dst,
                                       int64_t n) {
  if (bias == nullptr) {
    cpu::store_row(dst, src, n);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<BF16>(src[i] + bias[i]);
}

// dst = float(src) over one row, and sums[i] += dst[i] (sums may be null).
GFM_CPU_CLONES void widen_and_sum(const BF16* __restrict src, float* __restrict dst, float* __restrict sums,
                                  int64_t n) {
  cpu::load_row(dst, src, n);
  if (sums == nullptr) return;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) sums[i] += dst[i];
}

void check_weight(const char* op, const at::Tensor& weight, const at::Tensor& like, int64_t in_features) {
  TORCH_CHECK(weight.defined() && weight.scalar_type() == at::kFloat, op,
              ": weight must be float32 holding bf16 values (round_to_bf16), got ",
              weight.defined() ? weight.scalar_type() : at::ScalarType::Undefined);
  TORCH_CHECK(weight.device() == like.device(), op, ": weight is on ", weight.device(), " but the input is on ",
              like.device());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), op,
              ": weight must be a contiguous (out_features, in_features) matrix, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == in_features, op, ": weight has ", weight.size(1), " in_features but the input has ",
              in_features);
}

std::tuple<at::Tensor, at::Tensor> widened_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, kForward,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), kForward, ": x must be a contiguous (rows, in_features) matrix, got ",
              x.sizes());
  const int64_t rows = x.size(0), in_features = x.size(1);
  check_weight(kForward, weight, x, in_features);
  const int64_t out_features = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_input(kForward, "bias", *bias, weight, 1);
    check_shape(kForward, "bias", *bias, {out_features});
  }
  const bool from_fp32 = x.scalar_type() == at::kFloat;
  at::Tensor widened = at::empty({rows, in_features}, x.options().dtype(at::kFloat));
  at::Tensor rounded = at::empty(from_fp32 ? at::IntArrayRef{rows, in_features} : at::IntArrayRef{0},
                                 x.options().dtype(at::kBFloat16));
  float* w = widened.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(in_features), [&](int64_t begin, int64_t end) {
    const int64_t offset = begin * in_features, n = (end - begin) * in_features;
    if (from_fp32) {
      round_and_widen(x.data_ptr<float>() + offset, rounded.data_ptr<BF16>() + offset, w + offset, n);
    } else {
      widen(x.data_ptr<BF16>() + offset, w + offset, n);
    }
  });
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // the GEMM stays fp32
  const at::Tensor sums = at::mm(widened, weight.t());
  at::Tensor out = at::empty({rows, out_features}, x.options().dtype(at::kBFloat16));
  const float* s = sums.data_ptr<float>();
  const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
  BF16* o = out.data_ptr<BF16>();
  at::parallel_for(0, rows, row_grain(out_features), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) add_bias_and_round(s + r * out_features, b, o + r * out_features, out_features);
  });
  return {out, rounded};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> widened_linear_backward_cpu(const at::Tensor& grad_out,
                                                                           const at::Tensor& rounded,
                                                                           const at::Tensor& weight, bool x_grad,
                                                                           bool weight_grad, bool bias_grad) {
  check_input(kBackward, "grad_out", grad_out, grad_out, 2);
  TORCH_CHECK(grad_out.scalar_type() == at::kBFloat16, kBackward, ": grad_out must be bfloat16, got ",
              grad_out.scalar_type());
  check_input(kBackward, "rounded", rounded, grad_out, 2);
  const int64_t rows = grad_out.size(0), out_features = grad_out.size(1), in_features = rounded.size(1);
  check_shape(kBackward, "rounded", rounded, {rows, in_features});
  check_weight(kBackward, weight, grad_out, in_features);
  check_shape(kBackward, "weight", weight, {out_features, in_features});
  const auto fp32 = grad_out.options().dtype(at::kFloat);
  at::Tensor grad = at::empty({rows, out_features}, fp32);
  cpu::ThreadPartials<float> partials(bias_grad ? out_features : 0);
  const BF16* g16 = grad_out.data_ptr<BF16>();
  float* g = grad.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(out_features), [&](int64_t begin, int64_t end) {
    float* sums = bias_grad ? partials.mine() : nullptr;
    for (int64_t r = begin; r < end; ++r) widen_and_sum(g16 + r * out_features, g + r * out_features, sums, out_features);
  });
  auto none = [&] { return at::empty({0}, fp32); };  // one each: outputs must not alias
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // the GEMMs stay fp32
  at::Tensor grad_x = x_grad ? at::mm(grad, weight) : none();
  at::Tensor grad_weight = none();
  if (weight_grad) {
    at::Tensor widened = at::empty({rows, in_features}, fp32);
    const BF16* src = rounded.data_ptr<BF16>();
    float* dst = widened.data_ptr<float>();
    at::parallel_for(0, rows, row_grain(in_features), [&](int64_t begin, int64_t end) {
      widen(src + begin * in_features, dst + begin * in_features, (end - begin) * in_features);
    });
    grad_weight = at::mm(grad.t(), widened);
  }
  return {grad_x, grad_weight, bias_grad ? partials.reduce() : none()};
}

at::Tensor round_to_bf16_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), kRound, ": x must be contiguous float32, got ",
              x.scalar_type());
  at::Tensor out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 16384,
                   [&](int64_t begin, int64_t end) { round_in_fp32(src + begin, dst + begin, end - begin); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CPU, m) {
  m.impl("widened_linear", &widened_linear_cpu);
  m.impl("_widened_linear_backward", &widened_linear_backward_cpu);
  m.impl("round_to_bf16", &round_to_bf16_cpu);
}

}  // namespace gfm_fast
