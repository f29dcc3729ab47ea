"""Our GFM step equals the reference GFM code's step (gfm_fast.models.reference): same weights,
batch and mask give the same losses and the same gradients for every trainable parameter, so every
speed figure in benchmarks/throughput.py compares like with like."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gfm_fast.masking import num_masked_blocks
from gfm_fast.models.reference import ReferenceGFM, reference_token_masks
from model_helpers import TINY_IMG, tiny_config, tiny_pretrainer


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_our_step_equals_the_reference_step(backend):
    torch.manual_seed(0)
    ours = tiny_pretrainer(ops_backend=backend)
    ref = ReferenceGFM(tiny_config())
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("teacher.layers.3.blocks", "teacher.norm", "teacher.head"))
                                  for k in missing)  # the reference keeps the teacher's unused tail
    images = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    token_mask = reference_token_masks(2, TINY_IMG, 32, 4, 0.6, np.random.default_rng(0))
    block_mask = token_mask[:, ::8, ::8].bool()
    want = ref(images, token_mask)
    got = ours(images, block_mask)
    for g, w in zip((got.loss, got.loss_rec, got.loss_feat), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    want[0].backward()
    got.loss.backward()
    ref_params = dict(ref.student.named_parameters())
    for name, param in ours.student.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_reference_masks_are_the_release_generator():
    masks = reference_token_masks(3, 192, 32, 4, 0.6, np.random.default_rng(1))
    assert masks.shape == (3, 48, 48)
    blocks = masks[:, ::8, ::8]
    assert torch.equal(blocks.repeat_interleave(8, 1).repeat_interleave(8, 2), masks)
    assert (blocks.sum(dim=(1, 2)) == num_masked_blocks(36, 0.6)).all()
    assert not torch.equal(blocks[0], blocks[1])
