"""Masked timm Swin student: patch embedding, stage slicing, registration, input sizes."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from gfm_fast.config import SwinConfig
from gfm_fast.models.swin import (EncoderConfig, GFMSwinTransformer, MaskedPatchEmbed, allow_any_input_size,
                                  build_student, encoder_config_of, split_at_last_merging, variant_name)
from model_helpers import TINY_STUDENT, random_block_mask

TINY = SwinConfig(**TINY_STUDENT)


@pytest.fixture
def encoder():
    return build_student(TINY, ops_backend="reference").eval()


def test_parameter_names_are_timms_plus_mask_token(encoder):
    plain = SwinTransformer(img_size=128, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4,
                            num_classes=0)
    ours = set(encoder.state_dict())
    assert ours - set(plain.state_dict()) == {"mask_token"}
    assert set(plain.state_dict()) <= ours
    assert encoder.mask_token.shape == (1, 1, 16)
    assert 0 < encoder.mask_token.std() < 0.1  # trunc_normal(std=.02), not zeros


def test_unmasked_patch_embed_is_timms():
    ours = MaskedPatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=8, norm_layer=torch.nn.LayerNorm,
                            output_fmt="NHWC")
    timms = PatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=8, norm_layer=torch.nn.LayerNorm,
                       output_fmt="NHWC")
    timms.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), timms(x), rtol=0, atol=0)


def test_masked_patch_embed_values_and_grads(encoder):
    images = torch.randn(2, 3, 128, 128)
    mask = random_block_mask(2)
    out = encoder.patch_embed(images, mask, encoder.mask_token)
    assert out.shape == (2, 32, 32, 16)
    # by hand: conv -> LayerNorm -> blend with the 8x8-token-upsampled block mask
    proj, norm = encoder.patch_embed.proj, encoder.patch_embed.norm
    x = F.layer_norm(F.conv2d(images, proj.weight, proj.bias, stride=4).permute(0, 2, 3, 1), (16,), norm.weight,
                     norm.bias, norm.eps)
    m = mask.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(-1)
    expected = torch.where(m, encoder.mask_token.view(1, 1, 1, 16), x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    params = [proj.weight, proj.bias, norm.weight, norm.bias, encoder.mask_token]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for name, g, w in zip(["proj.weight", "proj.bias", "norm.weight", "norm.bias", "mask_token"], got, want):
        torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")


def test_masked_patch_embed_needs_a_token(encoder):
    with pytest.raises(ValueError, match="mask_token"):
        encoder.patch_embed(torch.randn(1, 3, 128, 128), random_block_mask(1))


def test_trunk_and_tail_equal_timms_own_forward(encoder):
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        h = encoder.forward_trunk(images)
        r = encoder.forward_tail(h)
        assert h.shape == r.shape == (2, 4, 4, 128)  # NHWC after the third merging
        torch.testing.assert_close(r, encoder.forward_features(images))
        # h = stage-3 output (timm's intermediates) through the third patch merging
        stage3 = encoder.forward_intermediates(images, indices=[2], intermediates_only=True)[0]  # NCHW
        torch.testing.assert_close(h, encoder.layers[3].downsample(stage3.permute(0, 2, 3, 1)))


def test_split_mapping(encoder):
    trunk, blocks, norm = split_at_last_merging(encoder)
    assert trunk == [encoder.layers[0], encoder.layers[1], encoder.layers[2], encoder.layers[3].downsample]
    assert blocks is encoder.layers[3].blocks and norm is encoder.norm


def test_grad_checkpointing_gives_same_grads():
    images = torch.randn(1, 3, 128, 128)
    mask = random_block_mask(1)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        enc = build_student(TINY, ops_backend="reference")
        enc.set_grad_checkpointing(enabled)
        enc.forward_tail(enc.forward_trunk(images, mask)).square().mean().backward()
        grads.append([p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_no_weight_decay_names(encoder):
    names = encoder.no_weight_decay()
    assert "mask_token" in names
    assert any("relative_position_bias_table" in n for n in names)


def test_registered_variants():
    student = timm.create_model("gfm_swin_test_patch4_window2_64")
    assert isinstance(student, GFMSwinTransformer) and student.num_features == 128
    assert student(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    teacher = timm.create_model("gfm_swin_base_patch4_window7_224", pretrained=False)
    assert type(teacher) is SwinTransformer and teacher.num_features == 1024
    assert teacher.patch_embed.img_size == (224, 224) and teacher.layers[0].blocks[0].attn.window_size == (7, 7)
    assert set(timm.list_models("gfm_swin_*")) >= {"gfm_swin_base_patch4_window6_192", "gfm_swin_large_patch4_window6_192",
                                                   "gfm_swin_base_patch4_window7_224", "gfm_swin_test_patch4_window2_64"}


def test_variant_names():
    assert variant_name(SwinConfig()) == "gfm_swin_base_patch4_window6_192"
    assert variant_name(SwinConfig(in_chans=12)) == "gfm_swin_base_patch4_window6_192"  # channels are not in names
    assert variant_name(TINY) == "gfm_swin_custom_patch4_window4_128"


def test_encoder_config_read_off_a_module(encoder):
    config = encoder_config_of(encoder)
    assert config.swin == TINY
    assert config.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="one per input channel"):
        EncoderConfig(TINY, mean=(0.5,), std=(0.5,))


def test_any_input_size_context_restores_the_model(encoder):
    images = torch.randn(1, 3, 96, 160)
    with pytest.raises(AssertionError):
        encoder.forward_features(images)
    with torch.no_grad(), allow_any_input_size(encoder):
        out = encoder.forward_features(images)
    assert out.shape == (1, 3, 5, 128)
    assert encoder.patch_embed.strict_img_size
    assert not any(b.dynamic_mask for stage in encoder.layers for b in stage.blocks)
    # at the build size both modes agree
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        fixed = encoder.forward_features(x)
        with allow_any_input_size(encoder):
            dynamic = encoder.forward_features(x)
    torch.testing.assert_close(fixed, dynamic)


def test_any_input_size_builds_each_shift_mask_once_per_size(encoder, monkeypatch):
    """Under allow_any_input_size a block builds its shift mask once per size, not every forward
    (a fresh mask would also miss the frozen attention-bias cache), and the masks go on exit."""
    built = []
    real = SwinTransformerBlock.get_attn_mask
    monkeypatch.setattr(SwinTransformerBlock, "get_attn_mask", lambda self, x=None, *a, **k: built.append(
        (id(self), tuple(x.shape[1:3]))) or real(self, x, *a, **k))
    blocks = sum(len(stage.blocks) for stage in encoder.layers)
    sizes = [(96, 160), (128, 128), (96, 160)]
    with torch.no_grad():
        expected = [encoder.forward_features(torch.ones(1, 3, 128, 128))]
        with allow_any_input_size(encoder):
            outs = [encoder.forward_features(torch.ones(1, 3, *size)) for size in sizes]
    assert len(built) == len(set(built)) == 2 * blocks  # two sizes, each block once per size
    torch.testing.assert_close(outs[1], expected[0])
    assert outs[0].shape == outs[2].shape and torch.equal(outs[0], outs[2])
    assert not any(hasattr(b, "_gfm_masks_by_size") for stage in encoder.layers for b in stage.blocks)
