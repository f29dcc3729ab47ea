"""model.bf16_matmul: which linear layers take the widened bf16 GEMM (gfm_fast.models.linear), and
that the student's losses and gradients and the teacher's features stay those of torch's bf16 path."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from gfm_fast.config import ConfigError
from gfm_fast.models import linear
from gfm_fast.models.linear import resolve_linear_path, set_bf16_matmul
from gfm_fast.ops.widened_linear import widened_linear
from model_helpers import TINY_IMG, random_block_mask, tiny_config, tiny_pretrainer


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(linear, "cpu_has_bf16_matmul", lambda: False)


def test_path_follows_device_dtype_and_cpu(monkeypatch):
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    assert resolve_linear_path("widened", x, weight) == "native"  # fp32 is never widened
    assert resolve_linear_path("widened", x.bfloat16(), weight.bfloat16()) == "widened"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_linear_path("native", x, weight) == "native"
        assert resolve_linear_path("widened", x, weight) == "widened"
        assert resolve_linear_path("widened", x.to("meta"), weight.to("meta")) == "native"  # CPU only
        for has_bf16, expected in ((False, "widened"), (True, "native")):
            monkeypatch.setattr(linear, "cpu_has_bf16_matmul", lambda: has_bf16)
            assert resolve_linear_path("auto", x, weight) == expected
    with torch.autocast("cpu", dtype=torch.float16):
        assert resolve_linear_path("widened", x, weight) == "native"


def test_every_linear_is_routed_and_bad_paths_are_errors():
    model = tiny_pretrainer(bf16_matmul="native")
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert layers and all(m.gfm_bf16_matmul == "native" for m in layers)  # student, projector and teacher
    with pytest.raises(ValueError, match="bf16 matmul path must be one of"):
        set_bf16_matmul(model, "fast")
    with pytest.raises(ConfigError, match="model.bf16_matmul"):
        tiny_config(bf16_matmul="fast").validate()


def test_linear_subclasses_with_their_own_forward_are_left_alone():
    """Only plain nn.Linear layers are routed: a subclass keeps its class and its own forward."""
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 4), Doubled(4, 4))
    set_bf16_matmul(model, "widened")
    assert type(model[0]) is linear.RoutedLinear and type(model[1]) is Doubled
    x = torch.randn(2, 4)
    torch.testing.assert_close(model[1](x), 2 * torch.nn.functional.linear(x, model[1].weight, model[1].bias))


def _losses_and_grads(model, images, mask):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack([out.loss, out.loss_rec, out.loss_feat]).detach(), grads


def test_student_under_autocast_matches_torchs_bf16(cpu_without_bf16, monkeypatch):
    torch.manual_seed(0)
    native = tiny_pretrainer(bf16_matmul="native")
    widened = copy.deepcopy(native)
    set_bf16_matmul(widened, "auto")
    calls = []
    monkeypatch.setattr(linear, "widened_linear", lambda *a, **k: calls.append(1) or widened_linear(*a, **k))
    images, mask = torch.randn(2, 3, TINY_IMG, TINY_IMG), random_block_mask(2)
    want_losses, want_grads = _losses_and_grads(native, images, mask)
    assert not calls
    got_losses, got_grads = _losses_and_grads(widened, images, mask)
    layers = sum(isinstance(m, nn.Linear) for m in widened.modules())
    assert len(calls) == layers  # every linear of the student (with the projector) and of the teacher
    torch.testing.assert_close(got_losses, want_losses, rtol=2e-2, atol=2e-2)
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        scale = want.abs().max().item()
        torch.testing.assert_close(got_grads[name], want, rtol=0.1, atol=0.05 * scale + 1e-6, msg=name)


def test_teacher_reuses_widened_weights_until_they_change(cpu_without_bf16):
    torch.manual_seed(0)
    teacher = tiny_pretrainer().teacher
    teacher.set_run_precision("bf16")
    images = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    first = teacher(images)
    qkv = teacher.layers[0].blocks[0].attn.qkv
    kept = qkv._gfm_widened[-1][0]
    torch.testing.assert_close(teacher(images), first, rtol=0, atol=0)
    assert qkv._gfm_widened[-1][0] is kept  # made once, not per call
    state = copy.deepcopy(teacher.state_dict())
    state["layers.0.blocks.0.attn.qkv.weight"].mul_(2)
    teacher.load_state_dict(state)  # an in-place write: the widened copy must follow
    assert qkv._gfm_widened[-1][0] is kept
    changed = teacher(images)
    assert qkv._gfm_widened[-1][0] is not kept
    native = copy.deepcopy(teacher)
    set_bf16_matmul(native, "native")
    assert not torch.equal(changed, first)
    torch.testing.assert_close(changed, native(images), rtol=2e-2, atol=2e-2)



def test_widened_block_compiles_as_one_graph(cpu_without_bf16, monkeypatch):
    """Under torch.compile the widened linears trace into the block's graph (no graph break) and
    compute what eager does."""
    torch.manual_seed(0)
    block = tiny_pretrainer().student.encoder.layers[0].blocks[0]
    x = torch.randn(2, 32, 32, 16, requires_grad=True)
    traced = []
    monkeypatch.setattr(linear, "widened_linear", lambda *a, **k: traced.append(1) or widened_linear(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=False)(x)
        assert len(traced) == 4  # qkv, proj, fc1, fc2
        eager = block(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert torch.equal(*(torch.autograd.grad(out.float().sum(), x)[0] for out in (compiled, eager)))


def test_compiles_without_graph_breaks_in_a_fresh_process():
    """The first call of a routed linear being a compiled one: the CPU check and the extension's
    import happen outside the trace (a graph break, or an error under fullgraph, otherwise)."""
    code = """
import warnings, torch
warnings.simplefilter("error", UserWarning)
from gfm_fast.models.linear import set_bf16_matmul
layer, x = set_bf16_matmul(torch.nn.Linear(16, 8), "auto"), torch.randn(4, 16)
def f(x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x).float()
torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x), rtol=0, atol=0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
