"""masked_patch_embed for every backend against gfm_fast.ops.reference: values and all gradients,
shapes from tiny to GFM's Swin-B embed, odd grids, all/none-masked rows, 16-bit dtypes,
non-contiguous inputs, fp64 gradcheck, opcheck of the C++ ops, torch.compile, error messages."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gfm_fast import ops
from gfm_fast.ops import reference
from gfm_fast.ops.masked_patch_embed import MaskedPatchEmbedFunction

from .utils import (assert_bitwise_equal, assert_close, backend_device_params, cpu_threads, is_interpreted,
                    make_mask, reference_dtype, skip_if_slow)

PARAM_NAMES = ("weight", "bias", "norm_weight", "norm_bias", "mask_token")


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    chans: int
    height: int
    width: int
    patch: int
    dim: int
    mask_h: int  # mask grid; divides the token grid (height / patch, width / patch)
    mask_w: int
    mask: str = "random"  # make_mask kind

    @property
    def grid(self):
        return self.height // self.patch, self.width // self.patch


CASES = [
    # Tiny enough for the Triton interpreter (B <= 2, dims <= 64, token grid <= 4x4).
    Case("tiny-token-mask", 1, 3, 8, 8, 4, 32, 2, 2),
    Case("tiny-block-mask-mixed", 2, 3, 8, 16, 4, 24, 1, 2, "mixed"),
    Case("tiny-patch2-odd-D", 2, 2, 6, 8, 2, 45, 3, 4),
    Case("tiny-all-masked", 2, 3, 8, 8, 4, 16, 2, 2, "all"),
    Case("tiny-none-masked", 2, 3, 8, 8, 4, 16, 1, 1, "none"),
    # C++ (and GPU) sweep.
    Case("gfm-swin-b", 2, 3, 192, 192, 4, 128, 6, 6),  # 32-px block mask over the 48x48 token grid
    Case("odd-5x7-blocks", 3, 4, 40, 56, 4, 40, 5, 7, "mixed"),
    Case("batch32", 32, 3, 16, 16, 4, 96, 2, 2, "mixed"),
    Case("wide-D1024", 2, 3, 16, 32, 4, 1024, 2, 4),
    Case("patch1", 2, 5, 5, 7, 1, 33, 5, 7),
    Case("multispectral", 2, 12, 24, 24, 4, 64, 3, 3, "all"),
]


def _skip_if_slow(backend, device, case: Case):
    skip_if_slow(backend, device, batch=case.batch, dims=(case.dim, case.chans * case.patch ** 2 // 3),
                 grid=case.grid)


def _make_inputs(case: Case, dtype, device):
    k = case.chans * case.patch ** 2
    images = torch.randn(case.batch, case.chans, case.height, case.width)
    params = {"weight": torch.randn(case.dim, case.chans, case.patch, case.patch) * k ** -0.5,
              "bias": 0.1 * torch.randn(case.dim), "norm_weight": 1 + 0.1 * torch.randn(case.dim),
              "norm_bias": 0.1 * torch.randn(case.dim), "mask_token": 0.02 * torch.randn(1, 1, case.dim)}
    mask = make_mask(case.batch, case.mask_h, case.mask_w, case.mask, device=device)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(images), {name: cast(p) for name, p in params.items()}, mask


def _fast(images, params, mask, patch, grad_out, backend, op=ops.masked_patch_embed):
    leaves = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    out = op(images, *(leaves[n] for n in PARAM_NAMES[:4]), mask, leaves["mask_token"], patch_size=patch,
             backend=backend)
    out.backward(grad_out)
    return out, {name: leaf.grad for name, leaf in leaves.items()}


def _reference(images, params, mask, patch, grad_out, dtype):
    ref = reference_dtype(dtype)
    leaves = {name: p.detach().to(ref).requires_grad_() for name, p in params.items()}
    out = reference.masked_patch_embed(images.to(ref), *(leaves[n] for n in PARAM_NAMES[:4]), mask,
                                       leaves["mask_token"], patch_size=patch)
    out.backward(grad_out.to(ref))
    return out, {name: leaf.grad for name, leaf in leaves.items()}


def _check_against_reference(case: Case, dtype, backend, device, conv_scale: float = 1.0):
    images, params, mask = _make_inputs(case, dtype, device)
    params["weight"], params["bias"] = params["weight"] * conv_scale, params["bias"] * conv_scale
    tokens = case.grid[0] * case.grid[1]
    grad_out = torch.randn(case.batch, tokens, case.dim, device=device).to(dtype)
    out, grads = _fast(images, params, mask, case.patch, grad_out, backend)
    expected, expected_grads = _reference(images, params, mask, case.patch, grad_out, dtype)
    assert out.dtype == dtype and out.shape == (case.batch, tokens, case.dim)
    assert_close("tokens", out, expected, dtype)
    for name in PARAM_NAMES:
        assert grads[name].dtype == dtype and grads[name].shape == params[name].shape, name
        assert_close(f"g_{name}", grads[name], expected_grads[name], dtype)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_fp32(backend, device, case):
    _skip_if_slow(backend, device, case)
    _check_against_reference(case, torch.float32, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[6]], ids=lambda c: c.name)
def test_matches_reference_other_dtypes(backend, device, dtype, case):
    _skip_if_slow(backend, device, case)
    _check_against_reference(case, dtype, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params(backends=("cpp",), devices=("cpu",)))
def test_two_cpu_threads_match_reference(backend, device):
    """The CPU kernels split rows over threads and add per-thread partial sums: with two threads
    the merged sums must still be the reference's."""
    with cpu_threads(2):
        _check_against_reference(CASES[6], torch.float32, backend, device)  # 3 images of 10 token rows


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_bitwise_deterministic(backend, device):
    """The parameter gradients sum over every token (per thread, per warp, per block): the same
    inputs must give the same bits, run after run."""
    case = CASES[1] if is_interpreted(backend, device) else CASES[5]
    images, params, mask = _make_inputs(case, torch.float32, device)
    grad_out = torch.randn(case.batch, case.grid[0] * case.grid[1], case.dim, device=device)
    (out, grads), (out_again, grads_again) = (_fast(images, params, mask, case.patch, grad_out, backend)
                                              for _ in range(2))
    assert_bitwise_equal("tokens", out, out_again)
    for name in PARAM_NAMES:
        assert_bitwise_equal(f"g_{name}", grads[name], grads_again[name])


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_float64_eps_is_exact(backend, device):
    """Token variance of the order of eps (conv outputs ~3e-3): the LayerNorm depends on eps at fp64
    precision, so an eps rounded to fp32 on the way into a kernel (rstd off by ~1e-8) fails here."""
    case = CASES[1]
    _skip_if_slow(backend, device, case)
    _check_against_reference(case, torch.float64, backend, device, conv_scale=3e-3)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_eps_argument_reaches_the_kernels(backend, device):
    """A non-default eps (0.1, of the order of the token variance here) changes the LayerNorm: the
    fused backends must use the eps they are given, not the default 1e-5."""
    case = CASES[1]
    images, params, mask = _make_inputs(case, torch.float64, device)
    params["weight"] = params["weight"] * 0.3
    leaves = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    want = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    grad_out = torch.randn(case.batch, case.grid[0] * case.grid[1], case.dim, device=device, dtype=torch.float64)
    out = ops.masked_patch_embed(images, *(leaves[n] for n in PARAM_NAMES[:4]), mask, leaves["mask_token"],
                                 patch_size=case.patch, eps=0.1, backend=backend)
    expected = reference.masked_patch_embed(images, *(want[n] for n in PARAM_NAMES[:4]), mask, want["mask_token"],
                                            patch_size=case.patch, eps=0.1)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert_close("tokens", out, expected, torch.float64)
    for name in PARAM_NAMES:
        assert_close(f"g_{name}", leaves[name].grad, want[name].grad, torch.float64)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_masked_rows_are_mask_token_and_send_no_gradient(backend, device):
    case = CASES[1]  # image 0 fully masked
    images, params, mask = _make_inputs(case, torch.float32, device)
    grad_out = torch.zeros(case.batch, case.grid[0] * case.grid[1], case.dim, device=device)
    grad_out[0] = torch.randn_like(grad_out[0])  # gradient only on the fully masked image
    out, grads = _fast(images, params, mask, case.patch, grad_out, backend)
    assert torch.equal(out[0], params["mask_token"].reshape(1, -1).expand_as(out[0]))
    for name in ("weight", "bias", "norm_weight", "norm_bias"):
        assert not grads[name].any(), f"masked tokens leaked a gradient into {name}"
    assert_close("g_mask_token", grads["mask_token"].flatten(), grad_out[0].sum(0), torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_block_mask_equals_token_mask(backend, device):
    """A coarse mask is upsampled on the fly exactly like its token-level expansion."""
    images, params, _ = _make_inputs(CASES[1], torch.float32, device)
    blocks = make_mask(2, 1, 2, "random", device=device)
    tokens = blocks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (2, 2, 4) token grid

    def run(mask):
        return ops.masked_patch_embed(images, params["weight"], params["bias"], params["norm_weight"],
                                      params["norm_bias"], mask, params["mask_token"], patch_size=4, backend=backend)

    assert torch.equal(run(blocks), run(tokens))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_noncontiguous_inputs(backend, device):
    case = CASES[2]
    images, params, mask = _make_inputs(case, torch.float32, device)
    grad_out = torch.randn(case.batch, case.grid[0] * case.grid[1], case.dim, device=device)
    expected, expected_grads = _fast(images, params, mask, case.patch, grad_out, backend)
    strided_images = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last memory
    strided = {name: torch.stack([p, torch.full_like(p, float("nan"))], dim=-1)[..., 0]  # every other element
               for name, p in params.items()}
    strided["weight"] = params["weight"].transpose(0, 1).contiguous().transpose(0, 1)
    strided_mask = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (strided_images.is_contiguous() or strided["bias"].is_contiguous() or strided_mask.is_contiguous())
    out, grads = _fast(strided_images, strided, strided_mask, case.patch, grad_out.transpose(0, 1).contiguous()
                       .transpose(0, 1), backend)
    assert_close("tokens", out, expected, torch.float32, tolerance=1e-6)
    for name in PARAM_NAMES:
        assert_close(f"g_{name}", grads[name], expected_grads[name], torch.float32, tolerance=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_gradcheck_float64(backend, device):
    images = torch.randn(2, 1, 4, 6, dtype=torch.float64, device=device)
    mask = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]], device=device)  # token grid 2x3, cells 2x1
    params = [torch.randn(4, 1, 2, 2), torch.randn(4), 1 + 0.1 * torch.randn(4), torch.randn(4), torch.randn(4)]
    params = [p.to(device=device, dtype=torch.float64).requires_grad_() for p in params]
    fn = lambda w, b, nw, nb, tok: ops.masked_patch_embed(images, w, b, nw, nb, mask, tok, patch_size=2,  # noqa: E731
                                                          backend=backend)
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7)


def test_functional_and_function_agree():
    case = CASES[1]
    images, params, mask = _make_inputs(case, torch.float32, "cpu")
    functional = ops.masked_patch_embed(images, *(params[n] for n in PARAM_NAMES[:4]), mask, params["mask_token"],
                                        patch_size=case.patch, backend="cpp")
    function = MaskedPatchEmbedFunction.apply(images, *(params[n] for n in PARAM_NAMES[:4]), mask.float(),
                                              params["mask_token"], case.patch, 1e-5, "cpp")
    assert torch.equal(functional, function)


def _op_args(dtype=torch.float32):
    case = CASES[1]
    images, params, mask = _make_inputs(case, dtype, "cpu")
    dim = case.dim
    return (images, params["weight"].reshape(dim, -1), params["bias"], params["norm_weight"], params["norm_bias"],
            mask.float(), params["mask_token"].reshape(dim), case.patch, 1e-5)


def test_opcheck_cpp_ops():
    pytest.importorskip("gfm_fast.ops._cpp_impl", reason="gfm_fast._C is not built")
    args = _op_args()
    torch.library.opcheck(torch.ops.gfm_fast.masked_patch_embed.default, args)
    images, weight, bias, norm_weight, _, mask, _, patch, eps = args
    grad_out = torch.randn(images.shape[0], 8, weight.shape[0])
    torch.library.opcheck(torch.ops.gfm_fast._masked_patch_embed_backward.default,
                          (grad_out, images, weight, bias, norm_weight, mask, patch, eps))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_torch_compile_fullgraph(backend, device):
    """The op is one opaque node under torch.compile (fullgraph: no graph break in the launcher's
    Python), and the compiled forward and backward equal the eager ones."""
    case = CASES[1]
    images, params, mask = _make_inputs(case, torch.float32, device)
    grad_out = torch.randn(case.batch, case.grid[0] * case.grid[1], case.dim, device=device)
    expected, expected_grads = _fast(images, params, mask, case.patch, grad_out, backend)
    compiled = torch.compile(ops.masked_patch_embed, backend="aot_eager", fullgraph=True)
    out, grads = _fast(images, params, mask, case.patch, grad_out, backend, op=compiled)
    assert_close("compiled tokens", out, expected, torch.float32, tolerance=1e-6)
    for name in PARAM_NAMES:
        assert_close(f"compiled g_{name}", grads[name], expected_grads[name], torch.float32, tolerance=1e-6)


# ---------------------------------------------------------------- errors


def _call(images=None, weight=None, mask=None, patch_size=4, backend="cpp", **overrides):
    base_images, params, base_mask = _make_inputs(CASES[1], torch.float32, "cpu")
    params.update(overrides)
    return ops.masked_patch_embed(base_images if images is None else images,
                                  params["weight"] if weight is None else weight, params["bias"],
                                  params["norm_weight"], params["norm_bias"], base_mask if mask is None else mask,
                                  params["mask_token"], patch_size=patch_size, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_error_messages(backend):
    with pytest.raises(TypeError, match="floating-point"):
        _call(images=torch.zeros(2, 3, 8, 16, dtype=torch.int64), backend=backend)
    with pytest.raises(TypeError, match="has dtype torch.float64 but images has torch.float32"):
        _call(bias=torch.zeros(24, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="is on meta but images is on cpu"):
        _call(bias=torch.zeros(24, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="check the number of input channels"):
        _call(weight=torch.zeros(24, 4, 4, 4), backend=backend)  # 4-channel conv on 3-channel images
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        _call(images=torch.zeros(2, 3, 10, 16), backend=backend)
    with pytest.raises(ValueError, match="does not divide the token grid"):
        _call(mask=torch.zeros(2, 3, 4), backend=backend)  # token grid 2x4
    with pytest.raises(ValueError, match="mask batch size"):
        _call(mask=torch.zeros(3, 2, 4), backend=backend)
    with pytest.raises(ValueError, match="norm_bias must have shape"):
        _call(norm_bias=torch.zeros(7), backend=backend)


def test_no_gradient_for_images():
    images = torch.randn(2, 3, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="gives no gradient for images"):
        _call(images=images)


def test_cpp_op_checks_its_arguments():
    """Direct torch.ops calls get TORCH_CHECK messages naming the argument and the fix."""
    pytest.importorskip("gfm_fast.ops._cpp_impl", reason="gfm_fast._C is not built")
    images, weight, bias, norm_weight, norm_bias, mask, token, patch, eps = _op_args()
    op = torch.ops.gfm_fast.masked_patch_embed
    with pytest.raises(RuntimeError, match="images must be contiguous"):
        op(images.transpose(2, 3), weight, bias, norm_weight, norm_bias, mask, token, patch, eps)
    with pytest.raises(RuntimeError, match="mask must be float32"):
        op(images, weight, bias, norm_weight, norm_bias, mask.bool(), token, patch, eps)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(D, C\*p\*p\)"):
        op(images, weight[:, :10].contiguous(), bias, norm_weight, norm_bias, mask, token, patch, eps)
    with pytest.raises(RuntimeError, match="mask_token must have shape"):
        op(images, weight, bias, norm_weight, norm_bias, mask, token[:3].contiguous(), patch, eps)
    with pytest.raises(RuntimeError, match="does not divide the token grid"):
        op(images, weight, bias, norm_weight, norm_bias, torch.zeros(2, 3, 3), token, patch, eps)
    with pytest.raises(RuntimeError, match="has dtype Double but the inputs are Float"):
        op(images, weight, bias.double(), norm_weight, norm_bias, mask, token, patch, eps)
