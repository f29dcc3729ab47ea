// CUDA kernels of cosine_distillation: L_feat = -mean_b cos(z_s[b], z_t[b]) with torch's
// cosine_similarity semantics (see csrc/cpu/cosine_distillation_kernel.cpp for the gradient).
// One thread block per row in each direction: the forward reads s and t once and keeps
// (s.t, |s|, |t|) per row; the backward reads s and t once more and writes g once. grad_loss is
// read on the device, so neither direction syncs with the host.
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_utils.cuh"
#include "geometry.h"

namespace gfm_fast {
namespace {

using cuda::acc_type;

constexpr int kThreads = 256;
constexpr const char* kForward = "cosine_distillation";
constexpr const char* kBackward = "_cosine_distillation_backward";

template <typename scalar_t>
__global__ void cosine_forward_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                                      int64_t D, acc_type<scalar_t> eps, acc_type<scalar_t>* __restrict__ stats,
                                      acc_type<scalar_t>* __restrict__ cosines) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t scratch[kThreads / cuda::kWarpSize];
  const int64_t row = blockIdx.x;
  const scalar_t* s = student + row * D;
  const scalar_t* t = teacher + row * D;
  acc_t st = 0, ss = 0, tt = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t a = static_cast<acc_t>(s[d]), b = static_cast<acc_t>(t[d]);
    st += a * b;
    ss += a * a;
    tt += b * b;
  }
  st = cuda::block_sum(st, scratch);
  ss = cuda::block_sum(ss, scratch);
  tt = cuda::block_sum(tt, scratch);
  if (threadIdx.x == 0) {
    const acc_t norm_s = ::sqrt(ss), norm_t = ::sqrt(tt);
    stats[row * kCosineStats] = st;
    stats[row * kCosineStats + 1] = norm_s;
    stats[row * kCosineStats + 2] = norm_t;
    cosines[row] = st / (cuda::max_of(norm_s, eps) * cuda::max_of(norm_t, eps));
  }
}

// g = coef * (t / (clamp_s * clamp_t) - dot / (clamp_t * clamp_s^2 * norm_s) * s), coef = -grad_loss / B;
// the second term is 0 at norm_s = 0 (torch's norm gradient there).
template <typename scalar_t>
__global__ void cosine_backward_kernel(const acc_type<scalar_t>* __restrict__ grad_loss,
                                       const scalar_t* __restrict__ student,
                                       const scalar_t* __restrict__ teacher,
                                       const acc_type<scalar_t>* __restrict__ stats, int64_t B, int64_t D,
                                       acc_type<scalar_t> eps, scalar_t* __restrict__ g_student) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const acc_t coef = -grad_loss[0] / static_cast<acc_t>(B);
  const acc_t dot = stats[row * kCosineStats], norm_s = stats[row * kCosineStats + 1];
  const acc_t norm_t = stats[row * kCosineStats + 2];
  const acc_t clamp_s = cuda::max_of(norm_s, eps), clamp_t = cuda::max_of(norm_t, eps);
  const acc_t along_t = coef / (clamp_s * clamp_t);
  const acc_t along_s = norm_s > 0 ? coef * (dot / norm_s / clamp_t) / (clamp_s * clamp_s) : acc_t(0);
  const scalar_t* s = student + row * D;
  const scalar_t* t = teacher + row * D;
  scalar_t* g = g_student + row * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    g[d] = static_cast<scalar_t>(along_t * static_cast<acc_t>(t[d]) - along_s * static_cast<acc_t>(s[d]));
  }
}

std::tuple<at::Tensor, at::Tensor> cosine_distillation_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                            double eps, bool needs_grad) {
  check_cosine_inputs(kForward, student, teacher);
  cuda::check_cuda(kForward, student);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), D = student.size(1);
  const auto acc_options = student.options().dtype(accumulate_dtype(student.scalar_type()));
  at::Tensor stats = at::empty({B, kCosineStats}, acc_options);
  at::Tensor cosines = at::empty({B}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cosine_distillation_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    cosine_forward_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), D, static_cast<acc_t>(eps),
        stats.data_ptr<acc_t>(), cosines.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor loss = cosines.sum().mul_(-1.0 / static_cast<double>(B)).to(student.scalar_type());
  return {loss, needs_grad ? stats : at::empty({0, kCosineStats}, acc_options)};
}

at::Tensor cosine_distillation_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                             const at::Tensor& teacher, const at::Tensor& row_stats, double eps) {
  check_cosine_backward_inputs(kBackward, grad_loss, student, teacher, row_stats);
  cuda::check_cuda(kBackward, student);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), D = student.size(1);
  // In the accumulation dtype, as the CPU kernel reads it: an fp32 grad_loss is not rounded to 16 bits.
  const at::Tensor grad = grad_loss.reshape({1}).to(accumulate_dtype(student.scalar_type())).contiguous();
  at::Tensor g_student = at::empty_like(student);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cosine_distillation_backward_cuda",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    cosine_backward_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<acc_t>(), student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
        row_stats.data_ptr<acc_t>(), B, D, static_cast<acc_t>(eps), g_student.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CUDA, m) {
  m.impl("cosine_distillation", &cosine_distillation_cuda);
  m.impl("_cosine_distillation_backward", &cosine_distillation_backward_cuda);
}

}  // namespace gfm_fast
