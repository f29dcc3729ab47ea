"""Launcher-level tests of the Triton backend (kernels/*.py through gfm_fast/ops/_triton_impl.py).

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py),
so every case is tiny. The shared op tests (tests/ops/test_<op>.py) cover the public API; here we
check the backend contract directly: values and gradients against gfm_fast.ops.reference
(fp64 and fp32 tight, bf16 loose against an fp32 reference), the edge cases the
contract names, and launcher validation messages. How the kernels are built (constexprs, autotune pruning, fp32
dot precision, compilation for an H100 without a GPU): tests/ops/test_triton_kernels_build.py.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from gfm_fast.kernels import cosine_distillation as cos_kernels  # noqa: E402
from gfm_fast.kernels import decoder_l1_loss as dec_kernels  # noqa: E402
from gfm_fast.kernels import masked_patch_embed as embed_kernels  # noqa: E402
from gfm_fast.ops import _triton_impl as impl  # noqa: E402
from gfm_fast.ops import reference  # noqa: E402

from .utils import assert_close, reference_dtype  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# --------------------------------------------------------------------------- masked_patch_embed

def _embed_inputs(batch, chans, height, width, patch, dim, mask_h, mask_w, dtype, mask_mode="random"):
    k = chans * patch * patch
    images = torch.randn(batch, chans, height, width)
    params = dict(weight=torch.randn(dim, k) * k ** -0.5, bias=torch.randn(dim) * 0.1,
                  norm_weight=1 + 0.1 * torch.randn(dim), norm_bias=0.1 * torch.randn(dim),
                  mask_token=0.02 * torch.randn(dim))
    mask = (torch.rand(batch, mask_h, mask_w) < 0.5).float()
    if mask_mode == "random" and batch > 1:
        mask[0] = 1.0  # one image fully masked, and at least one kept block in the last one
        mask[-1, 0, 0] = 0.0
    elif mask_mode == "none":
        mask.zero_()
    elif mask_mode == "all":
        mask.fill_(1.0)
    cast = lambda t: t.to(device=DEVICE, dtype=dtype).contiguous()  # noqa: E731
    return cast(images), {n: cast(p) for n, p in params.items()}, mask.to(DEVICE)


EMBED_CASES = [
    # (B, C, H, W, p, D, mask_h, mask_w): block-level mask of 2x1-token cells, non-square, D not 2^n
    (2, 3, 16, 28, 4, 24, 2, 7),
    (1, 3, 8, 8, 4, 128, 2, 2),  # B = 1, the GFM embed width, token-level mask
    (2, 12, 8, 12, 4, 40, 1, 1),  # multispectral: K = 192 spans several BLOCK_K slices
    (2, 3, 8, 12, 2, 16, 4, 6),  # patch 2, token-level mask
    (1, 3, 8, 12, 4, 200, 2, 3),  # wide D: the backward splits K = 48 into two BLOCK_K = 32 slices
]


def _run_embed(images, params, mask, patch, eps=1e-5):
    out, saved = impl.masked_patch_embed_forward(images, params["weight"], params["bias"], params["norm_weight"],
                                                 params["norm_bias"], mask, params["mask_token"], patch, eps)
    grad_out = torch.randn(out.shape, device=out.device).to(out.dtype)
    grads = impl.masked_patch_embed_backward(grad_out, saved, patch, eps)
    return out, grad_out, dict(zip(["weight", "bias", "norm_weight", "norm_bias", "mask_token"], grads))


def _reference_embed(images, params, mask, patch, grad_out, dtype):
    ref_dtype = reference_dtype(dtype)
    leaves = {n: p.detach().to(ref_dtype).requires_grad_() for n, p in params.items()}
    dim, k = leaves["weight"].shape
    chans = images.shape[1]
    out = reference.masked_patch_embed(images.to(ref_dtype), leaves["weight"].view(dim, chans, patch, patch),
                                       leaves["bias"], leaves["norm_weight"], leaves["norm_bias"], mask,
                                       leaves["mask_token"], patch_size=patch)
    out.backward(grad_out.to(ref_dtype))
    return out, {n: leaf.grad for n, leaf in leaves.items()}


def _check_embed(images, params, mask, patch, dtype):
    """Forward + backward through the backend; tokens and every gradient against the reference."""
    out, grad_out, grads = _run_embed(images, params, mask, patch)
    expected, expected_grads = _reference_embed(images, params, mask, patch, grad_out, dtype)
    assert out.dtype == dtype
    assert_close("out", out, expected, dtype)
    for name, grad in grads.items():
        assert grad.dtype == dtype
        assert_close(f"g_{name}", grad, expected_grads[name], dtype)
    return out, grads


@pytest.mark.parametrize("case", EMBED_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_patch_embed_matches_reference(case, dtype):
    batch, chans, height, width, patch, dim, mask_h, mask_w = case
    images, params, mask = _embed_inputs(batch, chans, height, width, patch, dim, mask_h, mask_w, dtype)
    out, _ = _check_embed(images, params, mask, patch, dtype)
    assert out.shape == (batch, (height // patch) * (width // patch), dim)


def test_masked_patch_embed_bf16_against_fp32_reference():
    images, params, mask = _embed_inputs(2, 3, 16, 28, 4, 24, 2, 7, torch.bfloat16)
    _check_embed(images, params, mask, 4, torch.bfloat16)


@pytest.mark.parametrize("mask_mode", ["none", "all"])
def test_masked_patch_embed_no_or_all_tokens_masked(mask_mode):
    images, params, mask = _embed_inputs(2, 3, 8, 12, 4, 20, 2, 3, torch.float32, mask_mode)
    out, grads = _check_embed(images, params, mask, 4, torch.float32)
    if mask_mode == "all":  # masked rows send no gradient into the conv or the norm
        for name in ("weight", "bias", "norm_weight", "norm_bias"):
            assert torch.count_nonzero(grads[name]) == 0, name
        assert torch.equal(out, params["mask_token"].expand_as(out))
    else:
        assert torch.count_nonzero(grads["mask_token"]) == 0


# --------------------------------------------------------------------------- decoder_l1_loss

def _decoder_inputs(batch, dim, grid_h, grid_w, stride, chans, dtype, mask_mode="random"):
    out_chans = stride * stride * chans
    features = torch.randn(batch, grid_h, grid_w, dim)  # NHWC
    weight = torch.randn(out_chans, dim) * dim ** -0.5
    bias = 0.1 * torch.randn(out_chans)
    images = torch.randn(batch, chans, grid_h * stride, grid_w * stride)
    mask = (torch.rand(batch, grid_h, grid_w) < 0.6).float()
    mask[0, 0, 0] = 1.0
    if mask_mode == "none":
        mask.zero_()
    elif mask_mode == "all":
        mask.fill_(1.0)
    elif batch > 1:
        mask[-1] = 0.0  # an image with no masked block
    cast = lambda t: t.to(device=DEVICE, dtype=dtype).contiguous()  # noqa: E731
    return cast(features), cast(weight), cast(bias), cast(images), mask.to(DEVICE)


def _reference_decoder(features, weight, bias, images, mask, stride, grad, dtype):
    ref_dtype = reference_dtype(dtype)
    leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (features, weight, bias)]
    features_nchw = leaves[0].permute(0, 3, 1, 2)
    loss = reference.decoder_l1_loss(features_nchw, leaves[1], leaves[2], images.to(ref_dtype), mask, stride=stride)
    loss.backward(grad.to(ref_dtype))
    return loss, [leaf.grad for leaf in leaves]


def _check_decoder(inputs, stride, grad, dtype):
    """Forward + backward through the backend; loss and the three gradients against the reference."""
    features, weight, bias, images, mask = inputs
    loss, saved = impl.decoder_l1_loss_forward(features, weight, bias, images, mask, stride, True)
    grads = impl.decoder_l1_loss_backward(grad, saved, stride)
    expected, expected_grads = _reference_decoder(features, weight, bias, images, mask, stride, grad, dtype)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert_close("loss", loss, expected, dtype)
    for name, got, want in zip(("g_features", "g_weight", "g_bias"), grads, expected_grads):
        assert got.dtype == dtype
        assert_close(name, got, want, dtype)


DECODER_CASES = [
    # (B, D, h, w, stride, C)
    (2, 24, 3, 5, 4, 3),  # non-square grid, an image with no masked block
    (1, 40, 2, 3, 4, 3),  # B = 1
    (2, 17, 5, 7, 2, 3),  # odd 5x7 grid, D not 2^n
    (2, 32, 2, 2, 4, 2),  # C = 2
]


@pytest.mark.parametrize("case", DECODER_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_l1_loss_matches_reference(case, dtype):
    batch, dim, grid_h, grid_w, stride, chans = case
    inputs = _decoder_inputs(batch, dim, grid_h, grid_w, stride, chans, dtype)
    _check_decoder(inputs, stride, torch.tensor(1.7, dtype=dtype, device=DEVICE), dtype)


def test_decoder_l1_loss_bf16_against_fp32_reference():
    inputs = _decoder_inputs(2, 24, 3, 5, 4, 3, torch.bfloat16)
    _check_decoder(inputs, 4, torch.tensor(1.0, dtype=torch.bfloat16, device=DEVICE), torch.bfloat16)


def test_decoder_l1_loss_all_blocks_masked():
    inputs = _decoder_inputs(2, 17, 3, 2, 4, 2, torch.float32, "all")
    _check_decoder(inputs, 4, torch.tensor(1.0, device=DEVICE), torch.float32)


def test_decoder_l1_loss_no_block_masked_gives_zero_loss_and_grads():
    # The reference's loss is 0 / 1e-5 = 0 here (reference.reconstruction_l1 refuses an empty mask).
    features, weight, bias, images, mask = _decoder_inputs(2, 24, 2, 3, 4, 3, torch.float32, "none")
    loss, saved = impl.decoder_l1_loss_forward(features, weight, bias, images, mask, 4, True)
    grads = impl.decoder_l1_loss_backward(torch.tensor(1.0, device=DEVICE), saved, 4)
    assert loss.item() == 0.0
    for grad, like in zip(grads, (features, weight, bias)):
        assert grad.shape == like.shape and torch.count_nonzero(grad) == 0


def test_decoder_l1_loss_zero_residual_has_zero_gradient():
    # |x| at x == 0 has gradient 0 (torch.sign); a perfect reconstruction must give exact zeros.
    features, weight, _, images, mask = _decoder_inputs(1, 16, 2, 2, 4, 3, torch.float32, "all")
    weight = torch.zeros_like(weight)
    bias = images[0].reshape(3, 2, 4, 2, 4).permute(0, 2, 4, 1, 3)[..., 0, 0].reshape(-1).contiguous()
    images = images[:, :, :4, :4].repeat(1, 1, 2, 2).contiguous()  # every block equals the bias pattern
    loss, saved = impl.decoder_l1_loss_forward(features, weight, bias, images, mask, 4, True)
    g_features, g_weight, g_bias = impl.decoder_l1_loss_backward(torch.tensor(1.0, device=DEVICE), saved, 4)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g_features) == 0 and torch.count_nonzero(g_weight) == 0
    assert torch.count_nonzero(g_bias) == 0


def test_decoder_l1_loss_without_grad_saves_nothing_and_is_deterministic():
    features, weight, bias, images, mask = _decoder_inputs(2, 24, 3, 5, 4, 3, torch.float32)
    loss, saved = impl.decoder_l1_loss_forward(features, weight, bias, images, mask, 4, False)
    loss_again, _ = impl.decoder_l1_loss_forward(features, weight, bias, images, mask, 4, False)
    loss_with_grad, _ = impl.decoder_l1_loss_forward(features, weight, bias, images, mask, 4, True)
    assert saved == ()
    assert torch.equal(loss, loss_again)  # fixed-order reduction: bitwise identical run to run
    # With grad the kernel stores signs too and is autotuned on its own: its tile (and so its
    # summation order) may differ on a GPU, the value may not.
    torch.testing.assert_close(loss_with_grad, loss, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="needs_grad=False"):
        impl.decoder_l1_loss_backward(torch.tensor(1.0, device=DEVICE), saved, 4)


def test_decoder_compaction_lists_masked_blocks_first():
    features, weight, bias, images, mask = _decoder_inputs(2, 16, 3, 5, 4, 3, torch.float32)
    _, residuals = dec_kernels.decoder_l1_loss_forward(features, weight, bias, images, mask, 4, True)
    flat = mask.flatten().cpu()
    count = int(flat.sum())
    order = residuals.order.cpu().long()
    assert residuals.count.item() == count
    assert torch.equal(order[:count], torch.nonzero(flat).flatten())  # masked, ascending
    assert sorted(order.tolist()) == list(range(flat.numel()))  # a permutation
    expected_inv = 1.0 / ((count * 16 + 1e-5) * 3)
    assert residuals.inv_norm.item() == pytest.approx(expected_inv, rel=1e-6)


def test_decoder_normaliser_is_exact_in_float64():
    """1 / ((count*s*s + eps) * C) to the last bit in fp64: eps must not pass through fp32 on the way."""
    features, weight, bias, images, mask = _decoder_inputs(1, 16, 1, 2, 4, 3, torch.float64)
    mask[0, 0, 0], mask[0, 0, 1] = 1.0, 0.0
    _, residuals = dec_kernels.decoder_l1_loss_forward(features, weight, bias, images, mask, 4, True)
    assert residuals.inv_norm.dtype == torch.float64
    assert residuals.inv_norm.item() == 1.0 / ((1 * 16 + 1e-5) * 3)


# --------------------------------------------------------------------------- cosine_distillation

def _cosine_inputs(batch, dim, dtype, special=True):
    student, teacher = torch.randn(batch, dim, dtype=torch.float64), torch.randn(batch, dim, dtype=torch.float64)
    if special and batch >= 4:
        student[1] = 0.0  # zero vector: norm clamped to eps, norm derivative 0
        student[2] *= 1e-10  # tiny but non-zero: clamped, the norm derivative still flows (torch)
        teacher[3] = 0.0
    return student.to(DEVICE, dtype), teacher.to(DEVICE, dtype)


def _reference_cosine(student, teacher, grad, dtype):
    leaf = student.detach().to(reference_dtype(dtype)).requires_grad_()
    loss = reference.cosine_distillation(leaf, teacher.to(leaf.dtype))
    loss.backward(grad.to(leaf.dtype))
    return loss, leaf.grad


@pytest.mark.parametrize("shape", [(5, 37), (1, 16), (2, 5000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cosine_distillation_matches_reference(shape, dtype):
    student, teacher = _cosine_inputs(*shape, dtype)
    loss, saved = impl.cosine_distillation_forward(student, teacher, 1e-8, True)
    grad = torch.tensor(0.7, dtype=dtype, device=DEVICE)
    (g_student,) = impl.cosine_distillation_backward(grad, saved, 1e-8)
    expected, expected_grad = _reference_cosine(student, teacher, grad, dtype)
    assert loss.dim() == 0 and loss.dtype == dtype and g_student.dtype == dtype
    assert_close("loss", loss, expected, dtype)
    # Gradients of near-zero vectors are ~1/eps large; compare them row by row at their own scale.
    for row in range(shape[0]):
        assert_close(f"g_student[{row}]", g_student[row], expected_grad[row], dtype)


def test_cosine_distillation_without_grad_saves_nothing():
    student, teacher = _cosine_inputs(3, 20, torch.float32)
    loss, saved = impl.cosine_distillation_forward(student, teacher, 1e-8, False)
    assert saved == ()
    assert_close("loss", loss, reference.cosine_distillation(student, teacher), torch.float32)


# --------------------------------------------------------------------------- torch.library custom ops

def _custom_op_cases():
    """(op, args) for every launch wrapped as a torch.ops.gfm_fast_triton op, tiny inputs."""
    images, params, mask = _embed_inputs(2, 3, 8, 12, 4, 16, 2, 3, torch.float32)
    embed_args = (images, params["weight"], params["bias"], params["norm_weight"], params["norm_bias"], mask,
                  params["mask_token"], 4, 1e-5)
    _, mean, rstd = torch.ops.gfm_fast_triton.masked_patch_embed_fwd(*embed_args)
    grad_out = torch.randn(2, 6, 16, device=DEVICE)
    # All blocks masked: the sign rows of unmasked blocks are never written (nor read), and opcheck
    # compares every output of two launches.
    features, weight, bias, dec_images, dec_mask = _decoder_inputs(2, 16, 2, 2, 4, 1, torch.float32, "all")
    dec_args = (features, weight, bias, dec_images, dec_mask, 4, True)
    _, *residuals = torch.ops.gfm_fast_triton.decoder_l1_loss_fwd(*dec_args)
    student, teacher = _cosine_inputs(3, 16, torch.float32, special=False)
    _, stats = torch.ops.gfm_fast_triton.cosine_distillation_fwd(student, teacher, 1e-8, True)
    half = torch.tensor(0.5, device=DEVICE)
    ops = torch.ops.gfm_fast_triton
    cases = {
        "masked_patch_embed_fwd": (ops.masked_patch_embed_fwd, embed_args),
        "masked_patch_embed_bwd": (ops.masked_patch_embed_bwd, (grad_out, images, params["weight"], params["bias"],
                                                                 params["norm_weight"], mask, mean, rstd, 4)),
        "decoder_l1_loss_fwd": (ops.decoder_l1_loss_fwd, dec_args),
        "decoder_l1_loss_fwd-no-grad": (ops.decoder_l1_loss_fwd, dec_args[:-1] + (False,)),
        "decoder_l1_loss_bwd": (ops.decoder_l1_loss_bwd, (half, features, weight, *residuals)),
        "cosine_distillation_fwd": (ops.cosine_distillation_fwd, (student, teacher, 1e-8, True)),
        "cosine_distillation_fwd-no-stats": (ops.cosine_distillation_fwd, (student, teacher, 1e-8, False)),
        "cosine_distillation_bwd": (ops.cosine_distillation_bwd, (half, student, teacher, stats, 1e-8)),
    }
    assert sorted(cases) == sorted(CUSTOM_OP_CASES)
    return cases


CUSTOM_OP_CASES = ["masked_patch_embed_fwd", "masked_patch_embed_bwd", "decoder_l1_loss_fwd",
                   "decoder_l1_loss_fwd-no-grad", "decoder_l1_loss_bwd", "cosine_distillation_fwd",
                   "cosine_distillation_fwd-no-stats", "cosine_distillation_bwd"]


@pytest.mark.parametrize("name", CUSTOM_OP_CASES)
def test_custom_op_registration(name):
    """torch.library.opcheck: schema, fake (shape-only) kernel against the real launch, and tracing
    with dynamic shapes: what torch.compile relies on to keep each launch one opaque node."""
    op, args = _custom_op_cases()[name]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- launcher validation

def test_masked_patch_embed_launcher_rejects_bad_inputs():
    images, params, mask = _embed_inputs(2, 3, 8, 12, 4, 16, 2, 3, torch.float32)
    args = lambda **kw: {**dict(images=images, mask=mask, **params), **kw}  # noqa: E731

    def call(**kw):
        a = args(**kw)
        embed_kernels.masked_patch_embed_forward(a["images"], a["weight"], a["bias"], a["norm_weight"],
                                                 a["norm_bias"], a["mask"], a["mask_token"], kw.get("patch", 4))

    with pytest.raises(ValueError, match=r"weight must have shape \(D, 48\).*\(16, 12\)"):
        call(weight=params["weight"][:, :12].contiguous())
    with pytest.raises(ValueError, match=r"images of shape \(2, 3, 8, 12\) are not divisible by patch_size 5"):
        call(patch=5)
    with pytest.raises(ValueError, match=r"mask must have shape.*got \(2, 2, 2\)"):
        call(mask=mask[:, :, :2].contiguous())
    with pytest.raises(ValueError, match="must be float32"):
        call(mask=mask.bool())
    with pytest.raises(ValueError, match=r"norm_bias must have shape \(16,\), got \(15,\)"):
        call(norm_bias=params["norm_bias"][:15])
    with pytest.raises(ValueError, match=r"images with shape \(2, 3, 8, 12\) must be contiguous"):
        call(images=images.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match=r"bias with shape \(16,\) has dtype torch.float64"):
        call(bias=params["bias"].double())


def test_decoder_launcher_rejects_bad_inputs():
    features, weight, bias, images, mask = _decoder_inputs(2, 16, 2, 3, 4, 3, torch.float32)

    def call(**kw):
        a = {**dict(features=features, weight=weight, bias=bias, images=images, mask=mask), **kw}
        dec_kernels.decoder_l1_loss_forward(a["features"], a["weight"], a["bias"], a["images"], a["mask"], 4)

    with pytest.raises(ValueError, match=r"features must be NHWC \(B, h, w, D\), got \(2, 3, 16\)"):
        call(features=features[:, 0])
    with pytest.raises(ValueError, match=r"images must have shape \(2, C, 8, 12\).*got \(2, 3, 8, 8\)"):
        call(images=images[..., :8].contiguous())
    with pytest.raises(ValueError, match=r"weight must have shape \(48, 16\).*got \(48, 15\)"):
        call(weight=weight[:, :15].contiguous())
    with pytest.raises(ValueError, match=r"bias must have shape \(48,\), got \(47,\)"):
        call(bias=bias[:47])
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 2, 3\).*got \(2, 1, 3\)"):
        call(mask=mask[:, :1].contiguous())
    with pytest.raises(ValueError, match=r"features with shape \(2, 2, 3, 16\) must be contiguous"):
        call(features=features.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1))
    _, no_grad_residuals = dec_kernels.decoder_l1_loss_forward(features, weight, bias, images, mask, 4, False)
    with pytest.raises(ValueError, match="run the forward with needs_grad=True"):
        dec_kernels.decoder_l1_loss_backward(torch.tensor(1.0, device=DEVICE), features, weight, no_grad_residuals)


def test_cosine_launcher_rejects_bad_inputs():
    student, teacher = _cosine_inputs(3, 8, torch.float32)
    with pytest.raises(ValueError, match=r"teacher shape \(3, 7\) must equal student shape \(3, 8\)"):
        cos_kernels.cosine_distillation_forward(student, teacher[:, :7].contiguous())
    with pytest.raises(ValueError, match=r"student must have shape \(B, D\).*got \(24,\)"):
        cos_kernels.cosine_distillation_forward(student.flatten(), teacher.flatten())
    with pytest.raises(ValueError, match=r"student with shape \(3, 8\) must be contiguous"):
        cos_kernels.cosine_distillation_forward(student.t().contiguous().t(), teacher)
    _, stats = cos_kernels.cosine_distillation_forward(student, teacher)
    with pytest.raises(ValueError, match=r"stats must be the contiguous \(3, 3\)"):
        cos_kernels.cosine_distillation_backward(torch.tensor(1.0), student, teacher, stats[:2])
    with pytest.raises(RuntimeError, match="needs_grad=False"):
        impl.cosine_distillation_backward(torch.tensor(1.0), (), 1e-8)
