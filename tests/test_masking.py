"""Block mask generator: counts, ratio, seeding and errors."""
import pytest
import torch

from gfm_fast.masking import generate_block_mask, num_masked_blocks


def test_gfm_default_counts_and_shapes():
    mask = generate_block_mask(8, 192, generator=torch.Generator().manual_seed(0))
    assert mask.blocks.shape == (8, 6, 6) and mask.blocks.dtype == torch.bool
    assert mask.blocks.sum(dim=(1, 2)).tolist() == [22] * 8  # ceil(0.6 * 36)
    assert mask.block_size == 32


@pytest.mark.parametrize("num_blocks, ratio, expected", [(36, 0.6, 22), (36, 0.5, 18), (4, 0.1, 1), (64, 0.75, 48),
                                                       # float products just above an integer: 0.28 * 25 = 7.000000000000001
                                                       (25, 0.28, 7), (100, 0.55, 55)])
def test_num_masked_blocks_is_ceil(num_blocks, ratio, expected):
    assert num_masked_blocks(num_blocks, ratio) == expected


def test_non_square_image_and_other_block_size():
    mask = generate_block_mask(3, (64, 96), block_size=16, ratio=0.25, generator=torch.Generator().manual_seed(1))
    assert mask.blocks.shape == (3, 4, 6)
    assert mask.blocks.sum(dim=(1, 2)).tolist() == [6, 6, 6]


def test_seeded_generator_is_deterministic_and_masks_differ_between_images():
    a = generate_block_mask(16, 192, generator=torch.Generator().manual_seed(42)).blocks
    b = generate_block_mask(16, 192, generator=torch.Generator().manual_seed(42)).blocks
    c = generate_block_mask(16, 192, generator=torch.Generator().manual_seed(43)).blocks
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.flatten().tolist()) for row in a}) > 1


def test_every_block_is_masked_about_equally_often():
    blocks = generate_block_mask(4000, 192, generator=torch.Generator().manual_seed(0)).blocks
    freq = blocks.float().mean(dim=0)  # expected 22/36 = 0.611 everywhere
    assert torch.allclose(freq, torch.full_like(freq, 22 / 36), atol=0.04)


def test_mask_lands_on_the_requested_device():
    """``device`` wins over the generator's device (the draw stays on the generator's)."""
    mask = generate_block_mask(2, 64, generator=torch.Generator().manual_seed(0), device="meta")
    assert mask.blocks.device.type == "meta" and mask.blocks.shape == (2, 2, 2)


def test_errors():
    with pytest.raises(ValueError, match="not divisible by the mask block size"):
        generate_block_mask(2, 200)
    for ratio in (1.5, 1.0, 0.0):  # 1.0 would leave the student no visible token, 0.0 no loss
        with pytest.raises(ValueError, match="ratio"):
            generate_block_mask(2, 192, ratio=ratio)
    with pytest.raises(ValueError, match="batch_size"):
        generate_block_mask(0, 192)
