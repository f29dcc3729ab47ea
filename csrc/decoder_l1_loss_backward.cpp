// _decoder_l1_loss_backward for every device. The forward (csrc/{cpu,cuda}/decoder_l1_loss_kernel.*)
// already computed the gradients for grad_loss = 1, so the backward only scales them; grad_loss
// stays on its device, so there is no host sync. Device-agnostic ATen: one CompositeExplicitAutograd
// kernel serves CPU and CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"

namespace gfm_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> decoder_l1_loss_backward(const at::Tensor& grad_loss,
                                                                        const at::Tensor& g_features,
                                                                        const at::Tensor& g_weight,
                                                                        const at::Tensor& g_bias) {
  check_scalar_grad("_decoder_l1_loss_backward", grad_loss, g_features);
  const at::Tensor scale = grad_loss.reshape({}).to(g_features.scalar_type());
  return {g_features * scale, g_weight * scale, g_bias * scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfm_fast, CompositeExplicitAutograd, m) {
  m.impl("_decoder_l1_loss_backward", &decoder_l1_loss_backward);
}

}  // namespace gfm_fast
