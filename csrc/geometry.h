// Shapes and argument checks of the three ops, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <tuple>

#include "checks.h"

namespace gfm_fast {

constexpr double kRecEps = 1e-5;  // added to sum(M) in L_rec (REC_EPS in gfm_fast/ops/reference.py)
constexpr int64_t kCosineStats = 3;  // cosine_distillation keeps s.t, |s|, |t| per row

// ---- masked_patch_embed

struct PatchGeometry {
  int64_t batch, chans, height, width, patch, grid_h, grid_w, dim, kdim, mask_h, mask_w;
  C10_HOST_DEVICE int64_t tokens() const { return grid_h * grid_w; }
  // A mask cell covers rep_h x rep_w tokens (1 x 1 at token level, 8 x 8 for 32-px blocks of 4-px patches).
  C10_HOST_DEVICE int64_t rep_h() const { return grid_h / mask_h; }
  C10_HOST_DEVICE int64_t rep_w() const { return grid_w / mask_w; }
};

// The geometry is built once, from the checked sizes (each field named where it is set).
inline PatchGeometry check_patch_embed_inputs(const char* op, const at::Tensor& images, const at::Tensor& weight,
                                              const at::Tensor& bias, const at::Tensor& norm_weight,
                                              const at::Tensor& mask, int64_t patch_size) {
  check_float_input(op, "images", images, 4);
  TORCH_CHECK(patch_size > 0, op, ": patch_size must be positive, got ", patch_size);
  const int64_t batch = images.size(0), chans = images.size(1), height = images.size(2), width = images.size(3);
  TORCH_CHECK(height % patch_size == 0 && width % patch_size == 0, op, ": image size ", height, "x", width,
              " is not divisible by patch_size ", patch_size);
  const int64_t grid_h = height / patch_size, grid_w = width / patch_size;
  check_input(op, "weight", weight, images, 2);
  const int64_t dim = weight.size(0), kdim = chans * patch_size * patch_size;
  TORCH_CHECK(weight.size(1) == kdim, op, ": weight must have shape (D, C*p*p) = (", dim, ", ", kdim, ") for ",
              chans, "-channel images and patch_size ", patch_size, ", got ", weight.sizes(),
              "; check the number of input channels");
  check_input(op, "bias", bias, images, 1);
  check_shape(op, "bias", bias, {dim});
  check_input(op, "norm_weight", norm_weight, images, 1);
  check_shape(op, "norm_weight", norm_weight, {dim});
  check_mask(op, mask, images, batch);
  const int64_t mask_h = mask.size(1), mask_w = mask.size(2);
  TORCH_CHECK(mask_h > 0 && mask_w > 0 && grid_h % mask_h == 0 && grid_w % mask_w == 0, op, ": mask grid ", mask_h,
              "x", mask_w, " does not divide the token grid ", grid_h, "x", grid_w,
              "; pass the mask at token level or at a coarser level that divides it (e.g. 32-px blocks)");
  return {.batch = batch, .chans = chans, .height = height, .width = width, .patch = patch_size, .grid_h = grid_h,
          .grid_w = grid_w, .dim = dim, .kdim = kdim, .mask_h = mask_h, .mask_w = mask_w};
}

// Forward arguments beyond check_patch_embed_inputs: the LayerNorm bias and the mask token (D,).
inline PatchGeometry check_patch_embed_forward_inputs(const char* op, const at::Tensor& images,
                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                      const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                                      const at::Tensor& mask, const at::Tensor& mask_token,
                                                      int64_t patch_size) {
  const PatchGeometry g = check_patch_embed_inputs(op, images, weight, bias, norm_weight, mask, patch_size);
  check_input(op, "norm_bias", norm_bias, images, 1);
  check_shape(op, "norm_bias", norm_bias, {g.dim});
  check_input(op, "mask_token", mask_token, images, 1);
  check_shape(op, "mask_token", mask_token, {g.dim});
  return g;
}

// The backward's outputs: (g_weight (D, C*p*p), g_bias, g_norm_weight, g_norm_bias, g_mask_token (D,)).
using PatchEmbedGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Backward arguments beyond check_patch_embed_inputs: grad_out (B, L, D).
inline PatchGeometry check_patch_embed_backward_inputs(const char* op, const at::Tensor& grad_out,
                                                       const at::Tensor& images, const at::Tensor& weight,
                                                       const at::Tensor& bias, const at::Tensor& norm_weight,
                                                       const at::Tensor& mask, int64_t patch_size) {
  const PatchGeometry g = check_patch_embed_inputs(op, images, weight, bias, norm_weight, mask, patch_size);
  check_input(op, "grad_out", grad_out, images, 3);
  check_shape(op, "grad_out", grad_out, {g.batch, g.tokens(), g.dim});
  return g;
}

// ---- decoder_l1_loss

struct DecoderGeometry {
  int64_t batch, grid_h, grid_w, dim, chans, stride, out_chans;
  C10_HOST_DEVICE int64_t blocks() const { return batch * grid_h * grid_w; }
  C10_HOST_DEVICE int64_t height() const { return grid_h * stride; }
  C10_HOST_DEVICE int64_t width() const { return grid_w * stride; }
};

inline DecoderGeometry check_decoder_inputs(const at::Tensor& features, const at::Tensor& weight,
                                            const at::Tensor& bias, const at::Tensor& images, const at::Tensor& mask,
                                            int64_t stride) {
  const char* op = "decoder_l1_loss";
  check_float_input(op, "features", features, 4);
  TORCH_CHECK(stride > 0, op, ": stride must be positive, got ", stride);
  check_input(op, "images", images, features, 4);
  const DecoderGeometry g{.batch = features.size(0), .grid_h = features.size(1), .grid_w = features.size(2),
                          .dim = features.size(3), .chans = images.size(1), .stride = stride,
                          .out_chans = stride * stride * images.size(1)};
  TORCH_CHECK(images.size(0) == g.batch && images.size(2) == g.height() && images.size(3) == g.width(), op,
              ": images must have shape (B, C, h*stride, w*stride) = (", g.batch, ", C, ", g.height(), ", ",
              g.width(), ") for NHWC features ", features.sizes(), " and stride ", stride, ", got ", images.sizes());
  check_input(op, "weight", weight, features, 2);
  check_shape(op, "weight", weight, {g.out_chans, g.dim});
  check_input(op, "bias", bias, features, 1);
  check_shape(op, "bias", bias, {g.out_chans});
  check_mask(op, mask, features, g.batch);
  TORCH_CHECK(mask.size(1) == g.grid_h && mask.size(2) == g.grid_w, op, ": mask must be at block level (B, ",
              g.grid_h, ", ", g.grid_w, "), one entry per decoder output position, got ", mask.sizes());
  return g;
}

// ---- cosine_distillation

inline void check_cosine_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher) {
  check_float_input(op, "student", student, 2);
  check_input(op, "teacher", teacher, student, 2);
  check_shape(op, "teacher", teacher, student.sizes());
  TORCH_CHECK(student.size(0) > 0, op, ": got an empty batch");
}

// Backward arguments: the inputs again, a scalar grad_loss and the forward's row stats (B, 3).
inline void check_cosine_backward_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& student,
                                         const at::Tensor& teacher, const at::Tensor& row_stats) {
  check_cosine_inputs(op, student, teacher);
  check_scalar_grad(op, grad_loss, student);
  const int64_t B = student.size(0);
  const at::ScalarType stats = accumulate_dtype(student.scalar_type());
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == B && row_stats.size(1) == kCosineStats &&
                  row_stats.scalar_type() == stats && row_stats.is_contiguous() &&
                  row_stats.device() == student.device(),
              op, ": row_stats must be the (", B, ", ", kCosineStats, ") ", stats,
              " tensor returned by cosine_distillation with needs_grad=True, got ", row_stats.sizes(), " ",
              row_stats.scalar_type());
}

}  // namespace gfm_fast
