"""GFM augmentation against torchvision's reference transforms (same seed -> same crop and flip)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import jpeg, textured
from gfm_fast.config import IMAGENET_MEAN, IMAGENET_STD
from gfm_fast.data.augment import CropBox, GFMAugment
from gfm_fast.data.decode import EncodedImage

SIZE = 48
SCALE, RATIO = (0.67, 1.0), (3 / 4, 4 / 3)


def _torchvision_reference(image: Image.Image, seed: int, hflip: float = 0.5) -> torch.Tensor:
    from torchvision import transforms as T

    pipeline = T.Compose([T.RandomResizedCrop(SIZE, scale=SCALE, ratio=RATIO, interpolation=T.InterpolationMode.BILINEAR),
                          T.RandomHorizontalFlip(hflip), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(seed)
    return pipeline(image)


def _ours(array: np.ndarray, augment: GFMAugment, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    height, width = array.shape[:2]
    box = augment.sample_box(width, height, generator)
    pixels = augment.crop_resize(array, box, (width, height))
    out = torch.empty(augment.in_chans, SIZE, SIZE)
    augment.normalize_into(out, pixels, array.dtype)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(60, 80), (97, 61), (SIZE, SIZE)])
def test_matches_torchvision_pipeline(seed, shape):
    array = textured(*shape, seed=seed)
    augment = GFMAugment(SIZE, 3, IMAGENET_MEAN, IMAGENET_STD, SCALE, RATIO, 0.5)
    ours = _ours(array, augment, seed)
    reference = _torchvision_reference(Image.fromarray(array), seed)
    # Same crop and flip; torch's antialiased uint8 resize rounds like Pillow's up to one grey level.
    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-6
    diff = (ours - reference).abs()
    assert diff.max() <= one_level, f"max diff {diff.max():.4g} at {np.unravel_index(diff.argmax(), diff.shape)}"
    assert diff.mean() < 0.5 * one_level  # most pixels agree exactly; none is off by more than one level


def test_crop_draws_are_torchvisions():
    """GFMAugment's defaults are GFM's recipe: torchvision's RandomResizedCrop(scale=(0.67, 1),
    ratio=(3/4, 4/3)) and a flip with p=0.5 draw the same boxes and flips."""
    from torchvision import transforms as T

    augment = GFMAugment(SIZE, 3, IMAGENET_MEAN, IMAGENET_STD)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(torch.empty(3, 70, 90), list(SCALE), list(RATIO))
        expected_flip = bool(torch.rand(1) < 0.5)
        box = augment.sample_box(90, 70, torch.Generator().manual_seed(seed))
        assert (box.top, box.left, box.height, box.width, box.flip) == (*expected, expected_flip)


def test_boxes_respect_scale_ratio_and_bounds():
    augment = GFMAugment(SIZE, 3, IMAGENET_MEAN, IMAGENET_STD, SCALE, RATIO, 0.5)
    generator = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(300):
        box = augment.sample_box(120, 90, generator)
        assert 0 <= box.top and box.top + box.height <= 90 and 0 <= box.left and box.left + box.width <= 120
        area = box.height * box.width / (120 * 90)
        assert SCALE[0] - 0.03 <= area <= SCALE[1] + 0.03
        flips += box.flip
    assert 100 < flips < 200


def test_centre_crop_fallback_for_extreme_aspect():
    augment = GFMAugment(SIZE, 3, IMAGENET_MEAN, IMAGENET_STD, (0.99, 1.0), (1.0, 1.0), 0.0)
    box = augment.sample_box(400, 10, torch.Generator().manual_seed(0))  # no 0.99-area square fits
    assert (box.top, box.left, box.height, box.width, box.flip) == (0, 195, 10, 10, False)


def test_flip_mirrors_the_crop():
    array = textured(64, 64)
    augment = GFMAugment(SIZE, 3, IMAGENET_MEAN, IMAGENET_STD)
    plain = augment.crop_resize(array, CropBox(3, 5, 50, 40, False), (64, 64))
    flipped = augment.crop_resize(array, CropBox(3, 5, 50, 40, True), (64, 64))
    torch.testing.assert_close(flipped, plain.flip(-1))


def test_gray_is_replicated_and_16bit_is_scaled_by_full_range():
    augment = GFMAugment(SIZE, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    gray16 = np.full((40, 40, 1), 65535 // 4, dtype=np.uint16)
    pixels = augment.crop_resize(gray16, CropBox(0, 0, 40, 40, False), (40, 40))
    out = torch.empty(3, SIZE, SIZE)
    augment.normalize_into(out, pixels, gray16.dtype)
    expected = ((65535 // 4) / 65535 - 0.5) / 0.25
    torch.testing.assert_close(out, torch.full_like(out, expected), atol=1e-5, rtol=0)


def test_multiband_uses_per_band_statistics():
    bands = 5
    mean, std = [0.1 * b for b in range(bands)], [0.5 + 0.1 * b for b in range(bands)]
    augment = GFMAugment(SIZE, bands, mean, std)
    array = np.stack([np.full((30, 30), 51 * b, np.uint8) for b in range(bands)], axis=-1)
    pixels = augment.crop_resize(array, CropBox(0, 0, 30, 30, False), (30, 30))
    out = torch.empty(bands, SIZE, SIZE)
    augment.normalize_into(out, pixels, array.dtype)
    for b in range(bands):
        torch.testing.assert_close(out[b], torch.full((SIZE, SIZE), (51 * b / 255 - mean[b]) / std[b]),
                                   atol=1e-5, rtol=0)


def test_draft_decode_keeps_the_crop_content():
    data = jpeg(512, 512, seed=3)
    augment = GFMAugment(SIZE, 3, IMAGENET_MEAN, IMAGENET_STD)
    box = CropBox(40, 60, 400, 420, False)
    assert augment.draft_reduction(box) == 8  # 400 // 8 = 50 >= 48
    full = augment.crop_resize(EncodedImage(data, "jpg").decode(3), box, (512, 512)).float()
    drafted = augment.crop_resize(EncodedImage(data, "jpg").decode(3, reduce=8), box, (512, 512)).float()
    assert (full - drafted).abs().mean() < 4  # same region, slightly different filtering


def test_bad_statistics_are_rejected():
    with pytest.raises(ValueError, match="mean and std need 4 entries"):
        GFMAugment(SIZE, 4, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="std must be positive"):
        GFMAugment(SIZE, 3, IMAGENET_MEAN, (0.2, 0.0, 0.2))


def test_reference_decoded_from_bytes_also_matches():
    data = jpeg(70, 90, seed=11)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    augment = GFMAugment(SIZE, 3, IMAGENET_MEAN, IMAGENET_STD)
    ours = _ours(EncodedImage(data, "jpg").decode(3), augment, 5)
    reference = _torchvision_reference(image, 5)
    assert (ours - reference).abs().mean() < 0.02  # decoders may differ by a level here and there
