"""ClippedAdamW (gfm_fast.training.optimizer) equals clip_grad_norm_ followed by torch's AdamW."""
from __future__ import annotations

import copy

import pytest
import torch

from gfm_fast.config import TrainConfig
from gfm_fast.training.optimizer import ClippedAdamW, build_optimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


@pytest.mark.parametrize("scale, max_norm", [(100.0, 1.0), (1e-3, 5.0), (10.0, 0.0)])
def test_clip_in_the_fused_kernel_equals_clip_then_step(scale, max_norm):
    ours, ref = _model(), _model()
    opt = ClippedAdamW(ours.parameters(), max_norm=max_norm, lr=1e-2, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(3):
        x = torch.randn(8, 16)
        for model in (ours, ref):
            (model(x).square().sum() * scale).backward()
        want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm if max_norm > 0 else float("inf"))
        ref_opt.step()
        opt.step()
        torch.testing.assert_close(opt.last_grad_norm, want_norm, rtol=1e-5, atol=0)
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        ref_opt.zero_grad()


def test_build_optimizer_by_zero_stage_and_precision():
    cfg = TrainConfig()
    params = lambda: [{"params": list(_model().parameters())}]  # noqa: E731
    assert isinstance(build_optimizer(params(), cfg, "fp32"), ClippedAdamW)
    assert build_optimizer(params(), cfg, "bf16-mixed").max_norm == cfg.optim.clip_grad
    plain = build_optimizer(params(), cfg, "bf16")  # DeepSpeed's bf16 wrapper clips its own copies
    assert type(plain) is torch.optim.AdamW and plain.defaults["fused"]
    cfg.optim.fused = False
    assert build_optimizer(params(), cfg, "fp32").defaults["fused"] is None  # torch's default AdamW


@pytest.mark.parametrize("fused, precision", [(True, "fp32"), (True, "bf16"), (False, "fp32")])
def test_every_optimizer_takes_the_configured_adamw_settings(fused, precision):
    """The paper's AdamW (0.9, 0.999), eps 1e-8, and whatever the config overrides, in each optimizer kind;
    weight decay comes from the parameter groups (none for norms and biases)."""
    cfg = TrainConfig()
    cfg.optim.fused = fused
    groups = [{"params": [torch.nn.Parameter(torch.ones(2, 2))], "weight_decay": 0.05},
              {"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0}]
    opt = build_optimizer(groups, cfg, precision)
    assert [(g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
        ((0.9, 0.999), 1e-8, 0.05), ((0.9, 0.999), 1e-8, 0.0)]
    cfg.optim.betas, cfg.optim.eps = (0.8, 0.95), 1e-6
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2))]}], cfg, precision)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["eps"] == 1e-6


def test_resumes_from_a_checkpoint_of_torchs_default_adamw():
    """Optimizer state written by torch's default AdamW (older runs, optim.fused=false) loads into
    ClippedAdamW, which keeps its fused kernel (torch's loader would take the file's kernel choice,
    which cannot apply the clip factor) and continues as clip_grad_norm_ + AdamW would."""
    ours, ref = _model(), _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    x = torch.randn(8, 16)
    (ref(x).square().sum() * 100).backward()
    ref_opt.step()
    ref_opt.zero_grad()
    ours.load_state_dict(ref.state_dict())
    opt = ClippedAdamW(ours.parameters(), max_norm=1.0, lr=1e-2, weight_decay=0.05)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    assert all(group["fused"] for group in opt.param_groups)
    for model in (ours, ref):
        (model(x).square().sum() * 100).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
