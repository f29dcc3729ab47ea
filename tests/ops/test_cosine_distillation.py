"""cosine_distillation for every backend against gfm_fast.ops.reference.cosine_distillation (torch's
cosine_similarity semantics, eps 1e-8): the loss and the student gradient over batch/width sweeps,
zero and sub-eps norms, 16-bit dtypes, non-contiguous inputs, fp64 gradcheck, opcheck of the C++
ops, torch.compile, error messages."""
from __future__ import annotations

import pytest
import torch

from gfm_fast import ops
from gfm_fast.ops import reference
from gfm_fast.ops.cosine_distillation import CosineDistillationFunction

from .utils import (assert_bitwise_equal, assert_close, backend_device_params, is_interpreted, random_scalar_grad,
                    reference_dtype, skip_if_slow)

SHAPES = [(1, 32), (2, 64), (2, 7), (5, 100), (16, 1024), (32, 1024), (3, 1000)]


def _make_inputs(batch, dim, dtype, device, special=False):
    student, teacher = torch.randn(batch, dim), torch.randn(batch, dim)
    if special:
        # Rows where torch's eps clamp matters: zero student, sub-eps student, zero teacher,
        # parallel and antiparallel pairs.
        student[0] = 0
        student[1] *= 1e-10
        teacher[2] = 0
        student[3] = 2.5 * teacher[3]
        student[4] = -teacher[4]
    return student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype)


def _fast(student, teacher, grad_loss, backend, op=ops.cosine_distillation):
    leaf = student.detach().clone().requires_grad_()
    loss = op(leaf, teacher, backend=backend)
    loss.backward(grad_loss)
    return loss, leaf.grad


def _reference(student, teacher, grad_loss, dtype):
    leaf = student.detach().to(reference_dtype(dtype)).requires_grad_()
    loss = reference.cosine_distillation(leaf, teacher.to(reference_dtype(dtype)))
    loss.backward(grad_loss.to(reference_dtype(dtype)))
    return loss, leaf.grad


def _check(batch, dim, dtype, backend, device, special=False):
    student, teacher = _make_inputs(batch, dim, dtype, device, special)
    grad_loss = random_scalar_grad(dtype, device)
    loss, grad = _fast(student, teacher, grad_loss, backend)
    expected, expected_grad = _reference(student, teacher, grad_loss, dtype)
    assert loss.dtype == dtype and loss.dim() == 0 and grad.dtype == dtype
    assert_close("loss", loss, expected, dtype)
    assert_close("g_student", grad, expected_grad, dtype)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_matches_reference(backend, device, shape, dtype):
    skip_if_slow(backend, device, batch=shape[0], dims=shape[1:], grid=(1,))
    _check(*shape, dtype, backend, device)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_zero_and_tiny_norms_match_torch(backend, device, dtype):
    """Rows with |s| = 0, 0 < |s| < eps, |t| = 0 and (anti)parallel pairs follow torch's clamp and its
    gradient (which differs from the true derivative below eps: torch clamps outside autograd)."""
    _check(6, 64 if backend == "triton" else 200, dtype, backend, device, special=True)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scales", [(1e-9, 1e-9), (1e-20, 1.0), (1e-20, 1e-20), (1e-22, 1e-22), (1e-30, 1e-30)],
                         ids=lambda s: f"s{s[0]:g}-t{s[1]:g}")
def test_tiny_magnitudes_match_torch(backend, device, dtype, scales):
    """Whole batches far below eps (norms down to fp32's subnormal range): finite and equal to torch.
    Such gradients are tiny, so they are compared at their own scale (assert_close's error is
    relative to max(1, max|expected|), which would accept anything this small)."""
    student, teacher = _make_inputs(4, 37, torch.float64, "cpu")
    student, teacher = (student * scales[0]).to(device, dtype), (teacher * scales[1]).to(device, dtype)
    grad_loss = random_scalar_grad(dtype, device)
    loss, grad = _fast(student, teacher, grad_loss, backend)
    expected, expected_grad = _reference(student, teacher, grad_loss, dtype)
    assert_close("loss", loss, expected, dtype)
    scale = expected_grad.abs().max().item()
    assert scale > 0
    assert_close("g_student / max|expected|", grad / scale, expected_grad / scale, dtype)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_bitwise_deterministic(backend, device):
    """The loss is a mean over the batch: the same inputs must give the same bits, run after run."""
    batch, dim = (2, 64) if is_interpreted(backend, device) else (256, 1024)
    student, teacher = _make_inputs(batch, dim, torch.float32, device)
    grad_loss = random_scalar_grad(torch.float32, device)
    (loss, grad), (loss_again, grad_again) = (_fast(student, teacher, grad_loss, backend) for _ in range(2))
    assert_bitwise_equal("loss", loss, loss_again)
    assert_bitwise_equal("g_student", grad, grad_again)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_teacher_gets_no_gradient(backend, device):
    student, teacher = _make_inputs(2, 16, torch.float32, device)
    student.requires_grad_()
    teacher.requires_grad_()
    ops.cosine_distillation(student, teacher, backend=backend).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_teacher_of_another_dtype_is_cast_to_the_students(backend, device):
    """A bf16 teacher (run under autocast) against an fp32 student: the documented cast, not a dtype error."""
    student, teacher = _make_inputs(2, 16, torch.float32, device)
    teacher = teacher.to(torch.bfloat16)
    grad_loss = torch.tensor(1.0, device=device)
    loss, grad = _fast(student, teacher, grad_loss, backend)
    expected, expected_grad = _reference(student, teacher.float(), grad_loss, torch.float32)
    assert loss.dtype == torch.float32
    assert_close("loss", loss, expected, torch.float32)
    assert_close("g_student", grad, expected_grad, torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_noncontiguous_inputs(backend, device):
    student, teacher = _make_inputs(4, 48, torch.float32, device)
    grad_loss = torch.tensor(1.5, device=device)
    expected, expected_grad = _fast(student, teacher, grad_loss, backend)
    loss, grad = _fast(student.t().contiguous().t(), torch.stack([teacher, teacher], -1)[..., 1], grad_loss, backend)
    assert_close("loss", loss, expected, torch.float32, tolerance=1e-6)
    assert_close("g_student", grad, expected_grad, torch.float32, tolerance=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_gradcheck_float64(backend, device):
    student, teacher = _make_inputs(3, 5, torch.float64, device)
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: ops.cosine_distillation(s, teacher, backend=backend), (student,))


def test_functional_and_function_agree():
    student, teacher = _make_inputs(4, 32, torch.float32, "cpu")
    functional = ops.cosine_distillation(student, teacher, backend="cpp")
    function = CosineDistillationFunction.apply(student, teacher, "cpp", False)
    assert torch.equal(functional, function)


@pytest.mark.parametrize("needs_grad", [True, False])
def test_opcheck_cpp_ops(needs_grad):
    pytest.importorskip("gfm_fast.ops._cpp_impl", reason="gfm_fast._C is not built")
    student, teacher = _make_inputs(4, 32, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.gfm_fast.cosine_distillation.default, (student, teacher, 1e-8, needs_grad))
    if needs_grad:
        _, stats = torch.ops.gfm_fast.cosine_distillation(student, teacher, 1e-8, True)
        torch.library.opcheck(torch.ops.gfm_fast._cosine_distillation_backward.default,
                              (torch.tensor(2.0), student, teacher, stats, 1e-8))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_torch_compile_fullgraph(backend, device):
    """The op is one opaque node under torch.compile (fullgraph), and loss and gradient equal the
    eager ones."""
    student, teacher = _make_inputs(4, 32, torch.float32, device)
    grad_loss = random_scalar_grad(torch.float32, device)
    expected, expected_grad = _fast(student, teacher, grad_loss, backend)
    compiled = torch.compile(ops.cosine_distillation, backend="aot_eager", fullgraph=True)
    loss, grad = _fast(student, teacher, grad_loss, backend, op=compiled)
    assert_close("compiled loss", loss, expected, torch.float32, tolerance=1e-6)
    assert_close("compiled g_student", grad, expected_grad, torch.float32, tolerance=1e-6)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_error_messages(backend):
    student = torch.randn(4, 8)
    with pytest.raises(ValueError, match="must have shape \\(B, D\\)"):
        ops.cosine_distillation(student[0], student[0], backend=backend)
    with pytest.raises(ValueError, match="does not match student features shape"):
        ops.cosine_distillation(student, torch.randn(4, 9), backend=backend)
    with pytest.raises(ValueError, match="empty batch"):
        ops.cosine_distillation(student[:0], student[:0], backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        ops.cosine_distillation(student.long(), student.long(), backend=backend)
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor, got list"):
        ops.cosine_distillation(student, student.tolist(), backend=backend)
    with pytest.raises(ValueError, match="is on meta but student is on cpu"):
        ops.cosine_distillation(student, torch.randn(4, 8, device="meta"), backend=backend)


def test_cpp_op_checks_its_arguments():
    pytest.importorskip("gfm_fast._C", reason="gfm_fast._C is not built")
    student, teacher = _make_inputs(4, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="teacher must have shape"):
        torch.ops.gfm_fast.cosine_distillation(student, teacher[:, :4].contiguous(), 1e-8, True)
    with pytest.raises(RuntimeError, match="teacher has dtype Double"):
        torch.ops.gfm_fast.cosine_distillation(student, teacher.double(), 1e-8, True)
    _, stats = torch.ops.gfm_fast.cosine_distillation(student, teacher, 1e-8, False)
    with pytest.raises(RuntimeError, match="row_stats must be the"):
        torch.ops.gfm_fast._cosine_distillation_backward(torch.tensor(1.0), student, teacher, stats, 1e-8)
