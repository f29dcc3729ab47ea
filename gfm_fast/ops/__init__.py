"""Fused GFM operators with interchangeable backends (reference | cpp | triton | auto).

    from gfm_fast import ops
    tokens = ops.masked_patch_embed(images, w, b, nw, nb, mask, mask_token)
    loss = ops.decoder_l1_loss(r, dec_w, dec_b, images, block_mask)
    loss = ops.cosine_distillation(z_s, z_t)

Where each op lives, for ``<op>`` in masked_patch_embed, decoder_l1_loss, cosine_distillation (one
name everywhere):

- math reference: ``gfm_fast/ops/reference.py``, function ``<op>`` (all plain-PyTorch references,
  the two losses included, in one file; ``gfm_fast.losses`` is its public name for the losses);
- entry point, input checks and autograd: ``gfm_fast/ops/<op>.py``;
- backend choice: ``gfm_fast/ops/_backend.py``; each fast backend implements ``<op>_forward`` /
  ``<op>_backward`` in ``_cpp_impl.py`` (C++/CUDA) or ``_triton_impl.py`` (Triton);
- kernels: ``kernels/<op>.py`` (Triton), ``csrc/cpu/<op>_kernel.cpp``, ``csrc/cuda/<op>_kernel.cu``
  (schemas in ``csrc/gfm_fast.cpp``, shape checks in ``csrc/geometry.h``);
- tests: ``tests/ops/test_<op>.py``; benchmark: ``benchmarks/ops_bench.py``.

``window_attention`` (Swin's window attention core, the path ``gfm_fast.models.attention`` takes on
CPU) follows the same layout with one fast backend, C++ on CPU: ``ops/window_attention.py``,
``csrc/cpu/window_attention_kernel.cpp``, ``reference.window_attention``,
``tests/ops/test_window_attention.py``. ``widened_linear`` (a bf16 linear on the fp32 GEMM, which
``gfm_fast.models.linear`` takes on CPUs without bf16 instructions) likewise: ``ops/widened_linear.py``,
``csrc/cpu/widened_linear_kernel.cpp`` (conversions only; the GEMM is torch's), tested against
float64 products of the bf16-rounded operands and torch's bf16 linear in
``tests/ops/test_widened_linear.py``.

The method behind the ops: docs/method.md; how the package is layered: docs/architecture.md.
"""
from gfm_fast.ops import reference
from gfm_fast.ops._backend import BACKENDS, BackendUnavailableError, available_backends, resolve
from gfm_fast.ops.cosine_distillation import cosine_distillation
from gfm_fast.ops.decoder_l1_loss import decoder_l1_loss
from gfm_fast.ops.masked_patch_embed import masked_patch_embed
from gfm_fast.ops.widened_linear import widened_linear
from gfm_fast.ops.window_attention import window_attention

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "resolve", "reference",
           "masked_patch_embed", "decoder_l1_loss", "cosine_distillation", "window_attention", "widened_linear"]
