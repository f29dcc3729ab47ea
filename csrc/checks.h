// Argument checks shared by the CPU and CUDA kernels of every op: one message per mistake, naming
// the argument, what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace gfm_fast {

// Every tensor argument reaches the kernels contiguous (the Python Functions make them so); a
// direct torch.ops call with a strided view gets this error instead of wrong reads.
inline void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                        int64_t dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the inputs are on ",
              like.device(), "; move all inputs to one device");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but the inputs are ", like.scalar_type(), "; cast them to one dtype");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

// What kernels accumulate in and return their fp32 statistics as: fp64 for fp64 inputs, fp32 otherwise.
inline at::ScalarType accumulate_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_float_input(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  check_input(op, name, t, t, dim);
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// The mask always travels as contiguous float32 0/1 on the inputs' device (ops/_common.py).
inline void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& like, int64_t batch) {
  TORCH_CHECK(mask.defined() && mask.dim() == 3, op, ": mask must have shape (B, h, w), got ",
              mask.defined() ? mask.sizes() : at::IntArrayRef{});
  TORCH_CHECK(mask.scalar_type() == at::kFloat, op, ": mask must be float32 0/1, got ", mask.scalar_type(),
              "; convert it with mask.float()");
  TORCH_CHECK(mask.device() == like.device(), op, ": mask is on ", mask.device(), " but the inputs are on ",
              like.device(), "; move it with .to(device)");
  TORCH_CHECK(mask.is_contiguous(), op, ": mask must be contiguous (call .contiguous())");
  TORCH_CHECK(mask.size(0) == batch, op, ": mask batch size ", mask.size(0), " does not match the batch size ",
              batch);
}

inline void check_scalar_grad(const char* op, const at::Tensor& grad, const at::Tensor& like) {
  TORCH_CHECK(grad.defined() && grad.numel() == 1, op, ": grad_loss must be a 0-dim tensor, got shape ",
              grad.defined() ? grad.sizes() : at::IntArrayRef{});
  TORCH_CHECK(grad.device() == like.device(), op, ": grad_loss is on ", grad.device(), " but the inputs are on ",
              like.device());
}

}  // namespace gfm_fast
