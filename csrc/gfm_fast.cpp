// gfm_fast._C: the schemas of the fused GFM ops (torch.ops.gfm_fast.*) and the build flags.
//
// Kernels register per device in csrc/cpu/<op>_kernel.cpp and csrc/cuda/<op>_kernel.cu (device-agnostic
// ones once, as CompositeExplicitAutograd, in csrc/<op>_backward.cpp). Autograd
// lives in the Python Functions (gfm_fast/ops/<op>.py), fake kernels in gfm_fast/ops/_cpp_impl.py.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(gfm_fast, m) {
  // Patchify conv + LayerNorm + mask-token blend. images (B, C, H, W); weight (D, C*p*p);
  // bias/norm_weight/norm_bias/mask_token (D,); mask (B, mh, mw) float 0/1 dividing (H/p, W/p).
  // -> tokens (B, L, D), L = (H/p)*(W/p) row-major.
  m.def(
      "masked_patch_embed(Tensor images, Tensor weight, Tensor bias, Tensor norm_weight, Tensor norm_bias, "
      "Tensor mask, Tensor mask_token, int patch_size, float eps) -> Tensor");
  // -> (g_weight (D, C*p*p), g_bias, g_norm_weight, g_norm_bias, g_mask_token (D,)); recomputes the
  // conv and norm statistics of the unmasked tokens instead of saving them.
  m.def(
      "_masked_patch_embed_backward(Tensor grad_out, Tensor images, Tensor weight, Tensor bias, "
      "Tensor norm_weight, Tensor mask, int patch_size, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // 1x1 conv + PixelShuffle(stride) + masked L1 over masked blocks only. features NHWC (B, h, w, D);
  // weight (O, D), O = stride*stride*C; images (B, C, h*stride, w*stride); mask (B, h, w) float 0/1.
  // -> (loss (), g_features (B, h, w, D), g_weight (O, D), g_bias (O,)): the gradients of the loss
  // for grad_loss = 1, computed in the same pass when needs_grad (else empty (0,) tensors).
  m.def(
      "decoder_l1_loss(Tensor features, Tensor weight, Tensor bias, Tensor images, Tensor mask, int stride, "
      "bool needs_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // Scales the gradients computed by the forward by grad_loss (0-dim).
  m.def(
      "_decoder_l1_loss_backward(Tensor grad_loss, Tensor g_features, Tensor g_weight, Tensor g_bias) "
      "-> (Tensor, Tensor, Tensor)");
  // -mean_b cos(student[b], teacher[b]) with torch's eps clamp of each norm. student/teacher (B, D).
  // -> (loss (), row_stats (B, 3) float32 (float64 for float64 inputs): dot, |s|, |t| per row when
  // needs_grad, else (0, 3)).
  m.def("cosine_distillation(Tensor student, Tensor teacher, float eps, bool needs_grad) -> (Tensor, Tensor)");
  // -> g_student (B, D), one pass over student and teacher using the forward's row_stats.
  m.def(
      "_cosine_distillation_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor row_stats, "
      "float eps) -> Tensor");
  // Swin window attention core softmax(scale * q k^T + bias) v per (window, head). qkv (W, N, 3C) as the
  // qkv projection writes it (q | k | v, each heads x head_dim); bias (G, heads, N, N) in the accumulation
  // dtype (float32, float64 for float64), window w adding bias[w % G] (relative position bias plus
  // shift mask). -> (out (W, N, C) heads side by side, as the output projection reads it; probs
  // (W, heads, N, N rounded up to 16, zero-padded) the softmax, saved for the backward when needs_grad,
  // else (0,)).
  m.def("window_attention(Tensor qkv, Tensor bias, int heads, float scale, bool needs_grad) -> (Tensor, Tensor)");
  // -> (grad_qkv (W, N, 3C); grad_scores (W, heads, N, N) in the accumulation dtype, the gradient of the
  // scores before the softmax (= of the bias, per window), when bias_grad, else (0,)).
  m.def(
      "_window_attention_backward(Tensor grad_out, Tensor qkv, Tensor probs, int heads, float scale, "
      "bool bias_grad) -> (Tensor, Tensor)");
  // A bf16 linear on the fp32 GEMM (CPUs without bf16 instructions). x (M, K) float32 or bfloat16;
  // weight (N, K) and bias (N,) float32 holding bf16 values (round_to_bf16). -> (out (M, N) bfloat16,
  // x rounded to bfloat16 (M, K) for the backward when x is float32, else (0,)).
  m.def("widened_linear(Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  // grad_out (M, N) and x_rounded (M, K) bfloat16 -> float32 (grad_x (M, K), grad_weight (N, K), grad_bias (N,)),
  // each (0,) when not asked for.
  m.def(
      "_widened_linear_backward(Tensor grad_out, Tensor x_rounded, Tensor weight, bool x_grad, bool weight_grad, "
      "bool bias_grad) -> (Tensor, Tensor, Tensor)");
  // float32 -> float32 with the values rounded to bfloat16 (round to nearest even).
  m.def("round_to_bf16(Tensor x) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gfm_fast C++/CUDA ops; the kernels are reached through torch.ops.gfm_fast";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
#ifdef _OPENMP
  m.attr("WITH_OPENMP") = true;
#else
  m.attr("WITH_OPENMP") = false;
#endif
}
