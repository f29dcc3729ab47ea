// CPU kernels of cosine_distillation: L_feat = -mean_b cos(z_s[b], z_t[b]), one pass each way.
//
// torch.nn.functional.cosine_similarity divides each vector by max(|v|, eps), with the clamp
// applied outside autograd, so its gradient is (u = t / max(|t|, eps), n_s = |s|):
//     d cos / d s = u / max(n_s, eps) - (s.u / max(n_s, eps)^2) * s / n_s      (second term 0 at n_s = 0)
// The forward keeps (s.t, |s|, |t|) per row so the backward reads s and t once and writes g once.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "geometry.h"
#include "cpu/cpu_utils.h"

namespace gfm_fast {
namespace {

using cpu::acc_type;

constexpr const char* kForward = "cosine_distillation";
constexpr const char* kBackward = "_cosine_distillation_backward";

template <typename scalar_t>
GFM_ALWAYS_INLINE void row_dots(const scalar_t* __restrict s, const scalar_t* __restrict t, int64_t D,
                                acc_type<scalar_t>* stats) {
  using acc_t = acc_type<scalar_t>;
  acc_t st = 0, ss = 0, tt = 0;
#pragma omp simd reduction(+ : st, ss, tt)
  for (int64_t d = 0; d < D; ++d) {
    const acc_t a = static_cast<acc_t>(s[d]), b = static_cast<acc_t>(t[d]);
    st += a * b;
    ss += a * a;
    tt += b * b;
  }
  stats[0] = st;
  stats[1] = std::sqrt(ss);
  stats[2] = std::sqrt(tt);
}

// g[b] = coef * d cos_b / d s[b] for every row, from the forward's (s.t, |s|, |t|).
template <typename scalar_t>
void backward_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_stats, double coef,
                   double eps, at::Tensor& g_student) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = student.size(0), D = student.size(1);
  const scalar_t* s = student.data_ptr<scalar_t>();
  const scalar_t* t = teacher.data_ptr<scalar_t>();
  const acc_t* st = row_stats.data_ptr<acc_t>();
  scalar_t* g = g_student.data_ptr<scalar_t>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t dot = st[b * kCosineStats], norm_s = st[b * kCosineStats + 1], norm_t = st[b * kCosineStats + 2];
      const acc_t clamp_s = std::max(norm_s, static_cast<acc_t>(eps));
      const acc_t clamp_t = std::max(norm_t, static_cast<acc_t>(eps));
      // g = coef * (t / (clamp_s * clamp_t) - dot / (clamp_t * clamp_s^2 * norm_s) * s), divided in an
      // order that keeps every intermediate in range (|dot| / norm_s <= norm_t).
      const acc_t along_t = static_cast<acc_t>(coef) / (clamp_s * clamp_t);
      const acc_t along_s =
          norm_s > 0 ? static_cast<acc_t>(coef) * (dot / norm_s / clamp_t) / (clamp_s * clamp_s) : acc_t(0);
      const scalar_t* sb = s + b * D;
      const scalar_t* tb = t + b * D;
      scalar_t* gb = g + b * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        gb[d] = static_cast<scalar_t>(along_t * static_cast<acc_t>(tb[d]) - along_s * static_cast<acc_t>(sb[d]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cosine_distillation_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                           double eps, bool needs_grad) {
  check_cosine_inputs(kForward, student, teacher);
  const int64_t B = student.size(0), D = student.size(1);
  const auto stats_options = student.options().dtype(accumulate_dtype(student.scalar_type()));
  at::Tensor stats = at::empty({B, kCosineStats}, stats_options);
  double cos_sum = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cosine_distillation_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* t = teacher.data_ptr<scalar_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) row_dots<scalar_t>(s + b * D, t + b * D, D, st + b * kCosineStats);
    });
    for (int64_t b = 0; b < B; ++b) {  // fixed order: the same loss for any thread count
      const acc_t* r = st + b * kCosineStats;
      const acc_t denom = std::max(r[1], static_cast<acc_t>(eps)) * std::max(r[2], static_cast<acc_t>(eps));
      cos_sum += static_cast<double>(r[0] / denom);
    }
  });
  at::Tensor loss = at::scalar_tensor(-cos_sum / static_cast<double>(B), student.options());
  return {loss, needs_grad ? stats : at::empty({0, kCosineStats}, stats.options())};
}

at::Tensor cosine_distillation_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                            const at::Tensor& teacher, const at::Tensor& row_stats, double eps) {
  check_cosine_backward_inputs(kBackward, grad_loss, student, teacher, row_stats);
  const int64_t B = student.size(0);
  at::Tensor g_student = at::empty_like(student);
  // d loss / d cos_b = -grad_loss / B for every row.
  const double coef = -grad_loss.item<double>() / static_cast<double>(B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cosine_distillation_backward_cpu",
                                  [&] { backward_rows<scalar_t>(student, teacher, row_stats, coef, eps, g_student); });
  return g_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CPU, m) {
  m.impl("cosine_distillation", &cosine_distillation_cpu);
  m.impl("_cosine_distillation_backward", &cosine_distillation_backward_cpu);
}

}  // namespace gfm_fast
