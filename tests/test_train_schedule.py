"""Pure parts of the training script: LR schedule, global-batch scaling, DeepSpeed config, resume choice."""
import math
from pathlib import Path

import pytest

from gfm_fast.config import ConfigError, load_config
from gfm_fast.training import (COMPLETE_MARKER, Checkpoints, TrainingError, check_same_architecture,
                            deepspeed_config, lr_at, make_schedule, resolve_config_path, resolve_precision,
                            resolve_resume)
from gfm_fast.training.schedule import resolve_grad_accum


def test_lr_warmup_then_cosine():
    kw = dict(total_steps=110, warmup_steps=10, base_lr=1.0, warmup_lr=0.0, min_lr=0.1)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # stays at the floor
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup


def test_schedule_scales_lr_by_global_batch_and_compresses_to_max_steps():
    cfg = load_config(overrides=["data.batch_size=128", "optim.grad_accum=2", "run.max_steps=0"])
    sched = make_schedule(cfg, steps_per_epoch=100, world_size=4)
    assert sched.global_batch == 128 * 4 * 2
    assert sched.base_lr == pytest.approx(2e-4 * 1024 / 512)
    assert sched.warmup_lr == pytest.approx(1e-6 * 2) and sched.min_lr == pytest.approx(1e-5 * 2)
    assert sched.total_steps == 100 * 50  # 100 epochs of 100 batches at 2 batches per step
    assert sched.warmup_steps == 10 * 50
    short = make_schedule(load_config(overrides=["run.max_steps=40"]), steps_per_epoch=100, world_size=1)
    assert short.total_steps == 40 and short.warmup_steps == 4  # same 10% warmup fraction
    assert short.stop_step == 40
    chunk = make_schedule(load_config(overrides=["run.max_steps=40", "optim.schedule_steps=400"]),
                          steps_per_epoch=100, world_size=1)
    assert chunk.total_steps == 400 and chunk.warmup_steps == 40 and chunk.stop_step == 40


def test_deepspeed_config_carries_recipe():
    cfg = load_config(overrides=["run.zero_stage=3", "optim.grad_accum=4", "data.batch_size=16"])
    ds = deepspeed_config(cfg, "bf16")
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_clipping"] == 5.0 and ds["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(cfg, "fp32") and "fp16" not in deepspeed_config(cfg, "fp32")
    mixed = deepspeed_config(cfg, "bf16-mixed")  # fp32 weights, autocast forward: no bf16 section
    assert mixed["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in mixed


def test_precision_per_device():
    def resolved(precision, device):
        return resolve_precision(load_config(overrides=[f"run.precision={precision}"]), device)

    assert resolved("auto", "cpu") == "fp32" and resolved("bf16", "cpu") == "bf16"
    assert resolved("bf16-mixed", "cpu") == "bf16-mixed"
    with pytest.raises(ConfigError, match="run.precision.*must be one of auto, fp32, bf16, bf16-mixed, fp16"):
        resolved("amp", "cpu")
    with pytest.raises(ConfigError, match="run.precision=fp16 needs a GPU"):
        resolved("fp16", "cpu")


@pytest.mark.parametrize("bf16_supported,want", [(True, "bf16-mixed"), (False, "fp16")])
def test_auto_precision_on_a_gpu(monkeypatch, bf16_supported, want):
    """bf16 autocast over fp32 weights where the GPU has bf16: DeepSpeed's own bf16 at ZeRO-0 syncs
    once per parameter (tests/test_benchmarks.py counts it)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert resolve_precision(load_config(), "cuda") == want


def test_global_batch_sets_the_accumulation_for_the_ranks():
    cfg = load_config(overrides=["data.batch_size=128", "optim.global_batch=1024"])
    assert [resolve_grad_accum(cfg, ranks).optim.grad_accum for ranks in (1, 2, 8)] == [8, 4, 1]
    assert resolve_grad_accum(cfg, 8) is not cfg and cfg.optim.grad_accum == 1  # a copy
    with pytest.raises(ConfigError, match=r"128 x 16 does not divide it; choose a data.batch_size that divides 64 "
                                          r"\(e\.g\. 64\)"):
        resolve_grad_accum(cfg, 16)
    with pytest.raises(ConfigError, match="choose a number of ranks that divides 1024"):
        resolve_grad_accum(cfg, 3)
    plain = load_config(overrides=["optim.grad_accum=3"])
    assert resolve_grad_accum(plain, 4) is plain  # global_batch 0: the global batch follows the ranks


def test_shipped_configs_load_and_validate():
    for name in ("tiny", "gfm_swin_base", "swin_large_zero3"):
        load_config(resolve_config_path(name))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config_path("no_such_config")


def test_shipped_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root: configs/ is not here
    expected = Path(resolve_config_path("tiny")).resolve()
    for spelling in ("configs/tiny.yaml", "configs/tiny", "tiny.yaml"):
        assert Path(resolve_config_path(spelling)).resolve() == expected, spelling
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("run: {max_steps: 3}\n")  # a local file wins
    assert resolve_config_path("configs/tiny.yaml") == "configs/tiny.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config_path("other/tiny.yaml")


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    ckpts = Checkpoints(tmp_path, keep_last=2)
    for step, complete in ((10, True), (20, True), (30, False)):  # step 30: an interrupted save
        d = tmp_path / "checkpoints" / Checkpoints.tag(step)
        d.mkdir(parents=True)
        if complete:
            (d / COMPLETE_MARKER).write_text("{}")
    assert resolve_resume("auto", ckpts).name == Checkpoints.tag(20)
    assert resolve_resume("none", ckpts) is None
    # --resume none / run.resume=none reach the config through the override parser, which reads
    # "none" as null: it must still mean "start afresh", not fail validation.
    for override in ("run.resume=none", "run.resume=None", "run.resume=null"):
        assert resolve_resume(load_config(None, [override]).run.resume, ckpts) is None, override
    assert resolve_resume(str(tmp_path), ckpts).name == Checkpoints.tag(20)
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / Checkpoints.tag(30)), ckpts)
    assert resolve_resume("auto", Checkpoints(tmp_path / "fresh", 2)) is None


def test_architecture_mismatch_is_named():
    a = {"student": {"embed_dim": 32}, "teacher": {"embed_dim": 32}, "mask_block": 32, "teacher_bands": [0, 1, 2]}
    b = {**a, "student": {"embed_dim": 64}}
    check_same_architecture(a, dict(a), Path("ckpt"))
    with pytest.raises(TrainingError) as error:
        check_same_architecture(a, b, Path("ckpt"))
    assert str(error.value) == ("checkpoint ckpt was trained with a different architecture (model.student.embed_dim: "
                                "checkpoint 32 vs config 64); use the config it was trained with, or --resume none "
                                "to start afresh")
    c = {**a, "student": {"embed_dim": 32, "depths": [2, 2]}, "mask_block": 64}
    with pytest.raises(TrainingError, match=r"\(model.student.depths: checkpoint None vs config \[2, 2\]; "
                                            r"model.mask_block: checkpoint 32 vs config 64\)"):
        check_same_architecture(a, c, Path("ckpt"))
    # The teacher and the bands it is fed are part of what a checkpoint was trained with, too.
    with pytest.raises(TrainingError, match=r"\(model.teacher.embed_dim: checkpoint 32 vs config 64; "
                                            r"model.teacher_bands: checkpoint \[0, 1, 2\] vs config \[2, 1, 0\]\)"):
        check_same_architecture(a, {**a, "teacher": {"embed_dim": 64}, "teacher_bands": [2, 1, 0]}, Path("ckpt"))


def test_optimizer_layout_mismatch_is_one_line():
    from gfm_fast.training.checkpoints import check_same_optimizer_layout

    fp32_zero0 = {"zero_optimization": {"stage": 0}}
    check_same_optimizer_layout(fp32_zero0, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}, Path("c"))
    with pytest.raises(TrainingError) as error:
        check_same_optimizer_layout(fp32_zero0, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
                                    Path("c"))
    assert str(error.value) == ("checkpoint c holds DeepSpeed optimizer state this run cannot load (ZeRO stage: "
                                "checkpoint 0 vs config 1 (use run.zero_stage=0); weights: checkpoint fp32 vs config "
                                "bf16 (use run.precision=fp32 or bf16-mixed)); resume with the checkpoint's settings, "
                                "or start a new run (--resume none or another --output-dir)")


@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
def test_tf32_choice_ends_with_the_run(api):
    """run.tf32 switches TF32 on for the run only, through whichever torch API the user set it with
    (after torch >= 2.9's fp32_precision, reading allow_tf32 raises)."""
    import types

    import torch

    from gfm_fast.config import TrainConfig
    from gfm_fast.training import set_math_modes

    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32  # put back through the legacy API, which every later read accepts
    try:
        if api == "legacy":
            matmul.allow_tf32 = False
            restore = set_math_modes(TrainConfig(), types.SimpleNamespace(type="cuda"))
            assert matmul.allow_tf32 is True
            restore()
            assert matmul.allow_tf32 is False
        else:
            if not hasattr(matmul, "fp32_precision"):
                pytest.skip("torch < 2.9 has only allow_tf32")
            matmul.fp32_precision = "ieee"
            restore = set_math_modes(TrainConfig(), types.SimpleNamespace(type="cuda"))
            assert matmul.fp32_precision == "tf32"
            restore()
            assert matmul.fp32_precision == "ieee"
    finally:
        matmul.allow_tf32 = saved


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT asks for a checkpoint at the next step; a second one (a step stuck on data,
    say) interrupts right away, as it would without the handler."""
    import os
    import signal

    from gfm_fast.training import _StopRequest

    stop = _StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between bytecodes
                pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        stop.restore()


def test_the_launchers_sigterm_after_a_ctrl_c_is_the_same_request():
    """DeepSpeed's launcher forwards a Ctrl-C to its trainers as SIGTERM, milliseconds after they got
    the terminal's SIGINT: one request, still answered with a checkpoint."""
    import os
    import signal

    from gfm_fast.training import _StopRequest

    def stopped_at_once(signum, frame):
        raise AssertionError("the launcher's SIGTERM was taken for a second request")

    previous = signal.signal(signal.SIGTERM, stopped_at_once)  # what the handler would hand the signal on to
    stop = _StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes
            pass
        assert stop.signum == signal.SIGINT
    finally:
        stop.restore()
        signal.signal(signal.SIGTERM, previous)

def test_the_resume_command_runs_from_the_directory_it_is_printed_in(tmp_path, monkeypatch):
    import gfm_fast
    from gfm_fast.training.loop import resume_command

    repo = Path(gfm_fast.__file__).parents[1]
    monkeypatch.chdir(repo)
    config = (tmp_path / "run" / "config.yaml").resolve()
    assert resume_command(tmp_path / "run", 1) == f"python gfm_fast/train.py --config {config} --resume auto"
    monkeypatch.chdir(tmp_path)  # elsewhere: the script's own path
    assert resume_command(tmp_path / "run", 2, under_srun=True) == (
        f"srun python {repo.resolve() / 'gfm_fast' / 'train.py'} --config {config} --resume auto")
