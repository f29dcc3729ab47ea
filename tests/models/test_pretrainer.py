"""GFMPretrainer / GFMStudent: losses and gradients against a step-by-step computation, masks, errors."""
import importlib.util

import pytest
import torch

from gfm_fast import ops
from gfm_fast.config import ConfigError, TrainConfig
from gfm_fast.models.pretrainer import GFMOutput, GFMPretrainer, GFMStudent, param_groups
from model_helpers import TINY_BLOCKS, TINY_IMG, manual_student, random_block_mask, tiny_config, tiny_pretrainer


def images(batch=2, chans=3):
    return torch.randn(batch, chans, TINY_IMG, TINY_IMG)


def test_structure_and_shapes():
    model = tiny_pretrainer()
    assert isinstance(model.student, GFMStudent) and model.config.student.img_size == TINY_IMG
    assert set(dict(model.student.named_children())) == {"encoder", "projector", "decoder"}
    assert model.student.projector.weight.shape == (128, 128)  # (T, F)
    keys = model.student.state_dict()
    assert keys["decoder.0.weight"].shape == (32 * 32 * 3, 128, 1, 1) and "decoder.0.bias" in keys
    out = model(images(), return_recon=True)
    assert isinstance(out, GFMOutput)
    assert out.loss.shape == out.loss_rec.shape == out.loss_feat.shape == ()
    assert out.recon.shape == (2, 3, TINY_IMG, TINY_IMG) and out.recon.grad_fn is None
    assert out.mask.shape == (2, TINY_BLOCKS, TINY_BLOCKS) and out.mask.dtype == torch.bool
    assert model(images()).recon is None


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_losses_and_grads_equal_step_by_step_reference(alpha):
    model = tiny_pretrainer(alpha=alpha)
    x, mask = images(), random_block_mask(2)
    out = model(x, mask, return_recon=True)
    z_t = model.teacher(x)
    expected, recon = manual_student(model, x, mask, z_t)
    torch.testing.assert_close(out.loss_rec, expected.loss_rec)
    torch.testing.assert_close(out.loss_feat, expected.loss_feat)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.loss, out.loss_rec + alpha * out.loss_feat)
    torch.testing.assert_close(out.recon, recon.detach())
    params = [p for p in model.student.parameters()]
    got = torch.autograd.grad(out.loss, params)
    want = torch.autograd.grad(expected.loss, params, allow_unused=True)
    names = [n for n, _ in model.student.named_parameters()]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, msg=lambda m: f"{name}: {m}")


def test_token_level_mask_equals_block_level():
    model = tiny_pretrainer()
    x, blocks = images(), random_block_mask(2)
    tokens = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2).float()  # (B, 32, 32), 8x8 tokens per block
    a, b = model(x, blocks), model(x, tokens)
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(b.mask, blocks)


def test_a_block_mask_from_generate_block_mask_is_taken_as_it_is():
    """README: masks come from gfm_fast.masking.generate_block_mask; forward takes its BlockMask."""
    from gfm_fast.masking import generate_block_mask

    model = tiny_pretrainer()
    x = images()
    drawn = generate_block_mask(2, TINY_IMG, generator=torch.Generator().manual_seed(1))
    out = model(x, drawn)
    assert torch.equal(out.mask, drawn.blocks)
    torch.testing.assert_close(out.loss, model(x, drawn.blocks).loss)
    with pytest.raises(ValueError, match="mask has 16-px blocks but the model masks 32-px blocks"):
        model(x, generate_block_mask(2, TINY_IMG, block_size=16))


def test_generated_masks_follow_the_config_and_the_generator():
    model = tiny_pretrainer()
    x = images(3)
    out1 = model(x, generator=torch.Generator().manual_seed(5))
    out2 = model(x, generator=torch.Generator().manual_seed(5))
    assert out1.mask.sum(dim=(1, 2)).tolist() == [10, 10, 10]  # ceil(0.6 * 16)
    assert torch.equal(out1.mask, out2.mask)
    torch.testing.assert_close(out1.loss, out2.loss)
    torch.testing.assert_close(out1.loss, model(x, out1.mask).loss)


def test_student_alone_matches_pretrainer():
    model = tiny_pretrainer()
    x, mask = images(), random_block_mask(2)
    direct = model.student(x, mask, model.teacher(x))
    torch.testing.assert_close(direct.loss, model(x, mask).loss)


def test_multispectral_student():
    model = tiny_pretrainer(student={"in_chans": 5}, teacher_bands=(2, 1, 0), mean=(0.0,) * 5, std=(1.0,) * 5)
    x, mask = images(chans=5), random_block_mask(2)
    assert model.student.decoder[0].weight.shape[0] == 32 * 32 * 5
    out = model(x, mask)
    expected, _ = manual_student(model, x, mask, model.teacher(x))
    torch.testing.assert_close(out.loss, expected.loss)


def test_grad_checkpointing_same_loss():
    x, mask = images(1), random_block_mask(1)
    torch.manual_seed(3)
    plain = tiny_pretrainer()
    torch.manual_seed(3)
    ckpt = tiny_pretrainer(grad_checkpointing=True)
    assert all(stage.grad_checkpointing for stage in ckpt.encoder.layers)
    a, b = plain(x, mask).loss, ckpt(x, mask).loss
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(plain.encoder.patch_embed.proj.weight.grad, ckpt.encoder.patch_embed.proj.weight.grad)


def test_param_groups():
    model = tiny_pretrainer()
    decay, no_decay = param_groups(model.student, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.student.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert "encoder.mask_token" in exempt
    assert all("relative_position_bias_table" not in n for n in decayed)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert {"projector.weight", "decoder.0.weight", "encoder.patch_embed.proj.weight"} <= decayed
    assert {"projector.bias", "encoder.norm.weight", "encoder.layers.0.blocks.0.norm1.bias"} <= exempt


def test_param_groups_of_a_pretrainer_leave_the_frozen_teacher_out():
    """The docstring's "or a GFMPretrainer": the teacher's frozen weights never reach the optimizer."""
    model = tiny_pretrainer()
    grouped = {id(p) for group in param_groups(model, 0.05) for p in group["params"]}
    assert grouped == {id(p) for p in model.student.parameters()}
    assert not grouped & {id(p) for p in model.teacher.parameters()}


def test_mask_blocks_coarser_than_the_decoder_grid():
    """model.mask_block = 64 with total stride 32: each mask block covers 2x2 decoder cells; the
    losses are those of the step-by-step computation on the 64-px block mask."""
    model = tiny_pretrainer(mask_block=64)
    x = images()
    mask = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]], dtype=torch.bool)  # (B, 128/64, 128/64)
    out = model(x, mask)
    expected, _ = manual_student(model, x, mask, model.teacher(x))
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.loss_rec, expected.loss_rec)
    torch.testing.assert_close(out.loss, expected.loss)


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 3, 3), r"mask must have shape \(B, 4, 4\)"),
    (torch.ones(3, 4, 4), r"mask must have shape"),
    (torch.full((2, 4, 4), 2.0), "only 0 and 1"),
    (torch.zeros(2, 4, 4), "mask is empty"),
    (torch.eye(32).expand(2, 32, 32), "not constant over 32-px blocks"),
])
def test_mask_errors(mask, match):
    with pytest.raises(ValueError, match=match):
        tiny_pretrainer()(images(), mask)


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(2, 4, TINY_IMG, TINY_IMG), ValueError, "4 channels but the student expects 3"),
    (torch.randn(2, 3, 96, 96), ValueError, "96x96 but the model is built for 128x128"),
    (torch.randn(3, TINY_IMG, TINY_IMG), ValueError, r"\(B, C, H, W\)"),
    (torch.zeros(2, 3, TINY_IMG, TINY_IMG, dtype=torch.uint8), TypeError, "floating-point"),
    (torch.randn(0, 3, TINY_IMG, TINY_IMG), ValueError, "empty batch"),
])
def test_image_errors(x, error, match):
    with pytest.raises(error, match=match):
        tiny_pretrainer()(x)


def test_config_errors():
    with pytest.raises(ConfigError, match="teacher_bands"):
        GFMPretrainer(tiny_config(teacher_bands=(0, 1)))
    with pytest.raises(ValueError, match="multiple of the student's total stride"):
        GFMPretrainer(tiny_config(mask_block=16))
    with pytest.raises(ConfigError, match="takes a ModelConfig or a TrainConfig, got str"):
        GFMPretrainer("configs/tiny.yaml")


@pytest.mark.filterwarnings("ignore:GFM teacher has NO weights")
def test_a_train_config_gives_its_model():
    torch.manual_seed(0)
    from_train = GFMPretrainer(TrainConfig(model=tiny_config()))
    torch.manual_seed(0)
    from_model = GFMPretrainer(tiny_config())
    assert from_train.config == from_model.config
    for (name, a), (_, b) in zip(from_train.state_dict().items(), from_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def cpp_ready() -> bool:
    return ops.available_backends()["cpp"]["cpu"] and importlib.util.find_spec("gfm_fast.ops._cpp_impl") is not None


@pytest.mark.skipif(not cpp_ready(), reason="C++ CPU backend not built")
def test_auto_backend_on_cpu_matches_reference():
    x, mask = images(), random_block_mask(2)
    torch.manual_seed(7)
    reference = tiny_pretrainer(ops_backend="reference")
    torch.manual_seed(7)
    auto = tiny_pretrainer(ops_backend="auto")
    a, b = reference(x, mask), auto(x, mask)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(reference.student.named_parameters(), auto.student.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_parameter_owners_are_called_for_the_fused_ops():
    """ZeRO-3 gathers a module's weights in its forward pre-hook: the decoder conv (too big to stay
    persistent) and the patch embedding must be *called*, not only have their weights read."""
    model = tiny_pretrainer()
    called = []
    model.student.decoder[0].register_forward_pre_hook(lambda *_: called.append("decoder.0"))
    model.encoder.patch_embed.register_forward_pre_hook(lambda *_: called.append("patch_embed"))
    model.student.projector.register_forward_pre_hook(lambda *_: called.append("projector"))
    model(images(), random_block_mask(2))
    assert sorted(called) == ["decoder.0", "patch_embed", "projector"]


def test_ops_backend_switch_reaches_every_op():
    model = tiny_pretrainer(ops_backend="auto")
    model.student.set_ops_backend("reference")
    assert model.encoder.patch_embed.backend == model.student.decoder[0].backend == "reference"
    out = model(images(), random_block_mask(2))  # runs on a box where "auto" may not be built
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="needs the block mask"):
        model.student.decoder[0](torch.randn(1, 128, 4, 4), images(1))


@pytest.mark.parametrize("path", ["sdpa", "explicit", "legacy_fused_attn"])
def test_attention_paths_give_the_same_losses_and_gradients(path):
    """model.attention picks the window-attention path (auto by default); each computes the same
    losses and gradients. The older key fused_attn still works (true = sdpa, false = explicit)."""
    from timm.models.swin_transformer import WindowAttention

    torch.manual_seed(0)
    auto = tiny_pretrainer()
    other = tiny_pretrainer(fused_attn=True) if path == "legacy_fused_attn" else tiny_pretrainer(attention=path)
    other.load_state_dict(auto.state_dict())
    want = "sdpa" if path == "legacy_fused_attn" else path
    assert all(m.gfm_attention == want for m in other.modules() if isinstance(m, WindowAttention))
    assert all(m.gfm_attention == "auto" for m in auto.modules() if isinstance(m, WindowAttention))
    images = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    mask = random_block_mask(2)
    out_a, out_o = auto(images, mask), other(images, mask)
    out_a.loss.backward()
    out_o.loss.backward()
    torch.testing.assert_close(out_a.loss, out_o.loss, rtol=1e-5, atol=1e-6)
    for (name, p_a), p_o in zip(auto.student.named_parameters(), other.student.parameters()):
        torch.testing.assert_close(p_a.grad, p_o.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not cpp_ready(), reason="C++ CPU backend not built")
def test_student_compiles_as_one_graph():
    """run.compile: the student (Swin, fused ops, losses) traces with no graph break (fullgraph),
    so every fused op is one node of the compiled graph, and the compiled step equals eager."""
    torch.manual_seed(0)
    model = tiny_pretrainer(ops_backend="cpp")
    ops.available_backends()  # what compile_in_place does: dynamo cannot trace the backends' import
    x, mask = images(), random_block_mask(2)
    z_t = model.teacher(x)
    want = model.student(x, mask, z_t)
    want_grads = torch.autograd.grad(want.loss, list(model.student.parameters()))
    compiled = torch.compile(model.student, backend="aot_eager", fullgraph=True, dynamic=False)
    got = compiled(x, mask, z_t)
    got_grads = torch.autograd.grad(got.loss, list(model.student.parameters()))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    for (name, _), g, w in zip(model.student.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("option", [{"checkpoint_stages": (2,)}, {"checkpoint_stages": (0, 3)},
                                    {"grad_checkpointing": True}])
def test_activation_checkpointing_keeps_losses_and_gradients(option):
    """model.checkpoint_stages / grad_checkpointing recompute activations in the backward: same
    numbers, and the chosen stages (only those) are checkpointed."""
    torch.manual_seed(0)
    plain = tiny_pretrainer()
    ckpt = tiny_pretrainer(**option)
    ckpt.load_state_dict(plain.state_dict())
    stages = option.get("checkpoint_stages", range(4))
    assert [layer.grad_checkpointing for layer in ckpt.encoder.layers] == [i in stages for i in range(4)]
    images, mask = torch.randn(2, 3, TINY_IMG, TINY_IMG), random_block_mask(2)
    out_p, out_c = plain(images, mask), ckpt(images, mask)
    out_p.loss.backward()
    out_c.loss.backward()
    torch.testing.assert_close(out_c.loss, out_p.loss, rtol=0, atol=0)
    for (name, p_p), p_c in zip(plain.student.named_parameters(), ckpt.student.parameters()):
        torch.testing.assert_close(p_c.grad, p_p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointed_last_stage_recomputes_in_the_backward():
    """checkpoint_stages=(3,) checkpoints the reconstruction tail too (forward_tail): its blocks run
    again in the backward; without checkpointing they run once."""
    calls = []
    for option, runs in (({"checkpoint_stages": (3,)}, 2), ({}, 1)):
        model = tiny_pretrainer(**option)
        block = model.encoder.layers[3].blocks[0]
        block.register_forward_pre_hook(lambda *args: calls.append(1))  # the recompute may stop early
        calls.clear()
        model(images(1), random_block_mask(1)).loss.backward()
        assert len(calls) == runs, option


def test_whole_model_pickles_with_its_paths():
    """torch.save of the module itself (not only its state dict) works and keeps the routed layers:
    the attention, linear and pad-before-shift routing are subclasses, not bound methods."""
    import io

    torch.manual_seed(0)
    model = tiny_pretrainer(attention="explicit", bf16_matmul="native").eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x, mask = images(), random_block_mask(2)
    torch.testing.assert_close(loaded(x, mask).loss, model(x, mask).loss, rtol=0, atol=0)
    routed = [m for m in loaded.modules() if hasattr(m, "gfm_attention") or hasattr(m, "gfm_bf16_matmul")]
    assert routed and all(getattr(m, "gfm_attention", "explicit") == "explicit" for m in routed)
