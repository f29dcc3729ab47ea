"""Reference losses against hand-computed values, and their error paths; gfm_fast.losses and
gfm_fast.masking are reachable as documented."""
import math
import subprocess
import sys

import pytest
import torch

from gfm_fast import ops
from gfm_fast.losses import cosine_distillation, reconstruction_l1


def test_reconstruction_l1_hand_computed():
    # 1 image, 2 channels, 4x4 pixels, 2x2 block mask with one masked block (top-left 2x2 pixels).
    images = torch.zeros(1, 2, 4, 4)
    recon = torch.zeros(1, 2, 4, 4)
    recon[0, 0, :2, :2] = 1.0  # error 1 on 4 masked pixels of channel 0
    recon[0, 1, :2, :2] = -3.0  # error 3 on 4 masked pixels of channel 1
    recon[0, :, 2:, 2:] = 100.0  # unmasked: must not count
    mask = torch.tensor([[[1, 0], [0, 0]]])
    expected = (4 * 1 + 4 * 3) / (4 + 1e-5) / 2
    assert reconstruction_l1(images, recon, mask).item() == pytest.approx(expected, rel=1e-6)


def test_reconstruction_l1_mask_resolutions_agree():
    images, recon = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    blocks = torch.rand(2, 2, 2) > 0.5
    blocks[:, 0, 0] = True
    tokens = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 4x4 view of the same mask
    pixels = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    a = reconstruction_l1(images, recon, blocks)
    b = reconstruction_l1(images, recon, tokens.float())
    c = reconstruction_l1(images, recon, pixels.int())
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_reconstruction_l1_gradient():
    images = torch.randn(1, 1, 2, 2)
    recon = torch.zeros(1, 1, 2, 2, requires_grad=True)
    mask = torch.ones(1, 1, 1)
    reconstruction_l1(images, recon, mask).backward()
    torch.testing.assert_close(recon.grad, -torch.sign(images) / (4 + 1e-5))


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 3, 3), "does not divide"),
    (torch.ones(3, 2, 2), "batch size"),
    (torch.ones(2, 2), r"shape \(B, h, w\)"),
    (torch.zeros(2, 2, 2), "empty"),
    (torch.full((2, 2, 2), 0.5), "only 0 and 1"),
])
def test_reconstruction_l1_bad_masks(mask, match):
    with pytest.raises((ValueError, TypeError), match=match):
        reconstruction_l1(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), mask)


def test_reconstruction_l1_bad_inputs():
    mask = torch.ones(1, 1, 1)
    with pytest.raises(ValueError, match="does not match images shape"):
        reconstruction_l1(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 8), mask)
    with pytest.raises(TypeError, match="floating-point"):
        reconstruction_l1(torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4), mask)
    with pytest.raises(TypeError, match="dtype"):
        reconstruction_l1(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4, dtype=torch.float64), mask)


def test_cosine_distillation_hand_computed():
    student = torch.tensor([[1.0, 0.0], [3.0, 4.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [6.0, 8.0]], requires_grad=True)
    loss = cosine_distillation(student, teacher)
    assert loss.item() == pytest.approx(-(0.0 + 1.0) / 2)
    loss.backward()
    assert teacher.grad is None  # the teacher side is detached
    # d/ds of -cos/2 at s=(1,0), t=(0,1): -(t/|t| - cos * s/|s|) / |s| / 2 = (0, -0.5)
    torch.testing.assert_close(student.grad[0], torch.tensor([0.0, -0.5]))


def test_cosine_distillation_eps_clamps_zero_vectors():
    loss = cosine_distillation(torch.zeros(1, 4), torch.ones(1, 4))
    assert loss.item() == 0.0 and math.isfinite(loss.item())


def test_cosine_distillation_errors():
    with pytest.raises(ValueError, match="does not match"):
        cosine_distillation(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        cosine_distillation(torch.zeros(2, 4, 1), torch.zeros(2, 4, 1))
    with pytest.raises(ValueError, match="empty"):
        cosine_distillation(torch.zeros(0, 4), torch.zeros(0, 4))


def test_losses_are_the_ops_references():
    """One home for the references: gfm_fast.losses names the functions the fused ops are tested against."""
    assert cosine_distillation is ops.reference.cosine_distillation
    assert reconstruction_l1 is ops.reference.reconstruction_l1


def test_losses_and_masking_are_attributes_of_the_package():
    """``import gfm_fast; gfm_fast.losses`` works in a fresh interpreter (the README's API table)."""
    code = ("import gfm_fast; import sys; "
            "assert 'gfm_fast.losses' not in sys.modules and 'gfm_fast.masking' not in sys.modules; "
            "print(gfm_fast.losses.reconstruction_l1.__name__, gfm_fast.masking.generate_block_mask.__name__); "
            "assert {'losses', 'masking'} <= set(dir(gfm_fast))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reconstruction_l1", "generate_block_mask"]
