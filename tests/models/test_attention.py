"""Window attention paths (gfm_fast.models.attention) against timm's own explicit attention.

timm's ``WindowAttention.forward`` with ``fused_attn=False`` is the independent reference: every
path must give its outputs and its gradients (input, qkv/proj weights and the relative-position
bias table) for plain and shifted windows, and the teacher's cached bias must follow its weights.
"""
from __future__ import annotations

import copy

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

from timm.models.swin_transformer import window_partition, window_reverse

from gfm_fast.models.attention import attention_path, from_windows, resolve_path, set_attention, to_windows
from gfm_fast.models.swin import pad_before_shift
from model_helpers import tiny_pretrainer

DIM, HEADS, WINDOW, SIZE = 32, 4, 4, 8  # an 8x8 map: 4 windows of 4x4 (16 tokens), shift 2


def _block(shift: int) -> SwinTransformerBlock:
    torch.manual_seed(0)
    block = SwinTransformerBlock(DIM, (SIZE, SIZE), num_heads=HEADS, window_size=WINDOW, shift_size=shift)
    with torch.no_grad():  # a bias table far from zero, so that a wrong gather would show
        block.attn.relative_position_bias_table.normal_(std=1.0)
    block.attn.fused_attn = False
    return block


def _run(block, x):
    out = block(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("path", ["auto", "cpp", "sdpa", "explicit"])
def test_paths_match_timm_values_and_gradients(shift, path):
    reference = _block(shift)
    ours = set_attention(pad_before_shift(copy.deepcopy(reference)), path)  # + the window-order gather
    x = torch.randn(2, SIZE, SIZE, DIM)
    want = _run(reference, x.clone().requires_grad_())
    got = _run(ours, x.clone().requires_grad_())
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5, msg=name)
    assert want[2]["attn.relative_position_bias_table"].abs().sum() > 0


@pytest.mark.parametrize("path", ["auto", "cpp", "sdpa", "explicit"])
def test_bf16_autocast_close_to_fp32(path):
    block = set_attention(_block(2), path)
    x = torch.randn(2, SIZE, SIZE, DIM)
    with torch.no_grad():
        exact = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = block(x)
    torch.testing.assert_close(low.float(), exact, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("shift", [0, 2])  # without and with the shifted windows' mask
def test_frozen_bias_is_cached_and_follows_the_weights(shift):
    reference = _block(shift)
    frozen = set_attention(copy.deepcopy(reference), "explicit").requires_grad_(False)
    x = torch.randn(1, SIZE, SIZE, DIM)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), reference(x))
        cache = frozen.attn._gfm_bias_cache[-1]
        frozen(x)
        assert frozen.attn._gfm_bias_cache[-1] is cache  # reused, not recomputed
        reference.attn.relative_position_bias_table.mul_(-1.0)
        frozen.load_state_dict(reference.state_dict())  # new weights: the cache must not survive
        torch.testing.assert_close(frozen(x), reference(x))
        # Module.to() keeps each Parameter object and swaps its data (same write count): the cache
        # must see that too, or a teacher moved to the GPU after a CPU forward keeps a CPU bias.
        cache = frozen.attn._gfm_bias_cache[-1]
        for model in (frozen, reference):
            model.to(torch.bfloat16).to(torch.float32)  # the table's values now rounded to bf16
        torch.testing.assert_close(frozen(x), reference(x))
        assert frozen.attn._gfm_bias_cache[-1] is not cache


def test_auto_picks_the_measured_fastest_path(monkeypatch):
    fp32, bf16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    assert resolve_path("auto", fp32, bias_needs_grad=True) == "cpp"  # the fused C++ kernel on CPU
    assert resolve_path("auto", bf16, bias_needs_grad=False) == "cpp"
    assert resolve_path("auto", fp32, bias_needs_grad=True, dropout=0.1) == "explicit"  # no dropout in the kernel
    with pytest.raises(ValueError, match="no attention dropout"):
        resolve_path("cpp", fp32, bias_needs_grad=True, dropout=0.1)
    assert resolve_path("auto", torch.zeros(1, device="meta"), bias_needs_grad=True) == "sdpa"  # not CPU: SDPA
    assert resolve_path("sdpa", bf16, bias_needs_grad=True) == "sdpa"
    assert resolve_path("explicit", fp32, bias_needs_grad=False) == "explicit"
    import gfm_fast.models.attention as attention  # without the extension built:

    monkeypatch.setattr(attention, "kernel_available", lambda device: False)
    assert resolve_path("auto", fp32, bias_needs_grad=False) == "sdpa"  # CPU flash kernel: the fp32 teacher
    assert resolve_path("auto", fp32, bias_needs_grad=True) == "explicit"  # SDPA's math fallback: the student
    assert resolve_path("auto", bf16, bias_needs_grad=False) == "explicit"  # bmm beats the flash kernel in bf16
    with pytest.raises(ValueError, match="attention path"):
        set_attention(_block(0), "flash")


def test_attention_path_is_set_inside_the_block_only():
    """Export runs the model on SDPA (standard operators) and leaves it as it was afterwards."""
    model = tiny_pretrainer()
    modules = [m for m in model.modules() if isinstance(m, WindowAttention)]
    modules[0].gfm_attention = "explicit"
    with attention_path(model, "sdpa"):
        assert all(m.gfm_attention == "sdpa" for m in modules)
        tokens = modules[0].window_size[0] * modules[0].window_size[1]
        x = torch.randn(4, tokens, modules[0].qkv.in_features)
        with torch.profiler.profile() as prof:
            modules[0](x)
        assert not any(e.name.startswith("gfm_fast::") for e in prof.events())
    assert modules[0].gfm_attention == "explicit" and all(m.gfm_attention == "auto" for m in modules[1:])


def test_every_window_attention_of_the_models_is_routed():
    model = tiny_pretrainer()
    modules = [m for m in model.modules() if isinstance(m, WindowAttention)]
    assert modules and all(getattr(m, "gfm_attention", None) == "auto" for m in modules)


@pytest.mark.parametrize("shift", [(0, 0), (3, 3), (2, 5)])
def test_window_order_gather_is_roll_then_partition(shift):
    """to_windows / from_windows equal timm's roll + window_partition / window_reverse + roll back,
    in values and in gradients."""
    window = (6, 6)
    x = torch.randn(2, 12, 18, 5, requires_grad=True)
    rolled = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    want = window_partition(rolled, window).reshape(-1, 36, 5)
    got = to_windows(x, window, shift)
    assert torch.equal(got, want)
    back = from_windows(got, 12, 18, window, shift)
    assert torch.equal(back, x)
    weights = torch.randn_like(want)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), x)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    assert torch.equal(grad_got, grad_want)
    reversed_timm = torch.roll(window_reverse(want.view(-1, 6, 6, 5), window, 12, 18), shifts=shift, dims=(1, 2))
    assert torch.equal(from_windows(want, 12, 18, window, shift), reversed_timm)


def test_window_orders_first_made_in_inference_mode_serve_training():
    """The cached window orders are normal tensors even when first built under inference_mode
    (extract_features), so a later training step can use them."""
    block = pad_before_shift(_block(2))
    x = torch.randn(1, SIZE, SIZE, DIM)
    with torch.inference_mode():
        block(x)
    block(x.requires_grad_()).sum().backward()
    assert x.grad is not None
