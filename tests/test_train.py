"""Short CPU training runs of the real train.py (tiny model, embedded sample shards, gloo).

In-process runs share one gloo process group per pytest worker. Runs of several processes (the
deepspeed launcher): test_train_distributed.py. Signals and SLURM: test_train_stop.py; command-line
errors: test_train_cli.py.
"""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import gfm_fast
from gfm_fast.training import COMPLETE_MARKER, Checkpoints, TrainingError
from gfm_fast.training.distributed import LAUNCHER_VARIABLES

from train_helpers import losses as _losses
from train_helpers import metric as _metric
from train_helpers import run_tiny as _run


def test_loss_decreases_and_outputs_are_written(tmp_path):
    result = _run(tmp_path, "run.max_steps=40", "optim.base_lr=2e-3", "run.preview_every=20")
    losses = _losses(tmp_path)
    assert len(losses) == 40
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.05, (first, last)
    out = Path(result.output_dir)
    assert (out / "config.yaml").is_file() and (out / "model" / "model.safetensors").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / Checkpoints.tag(40) / COMPLETE_MARKER).is_file()
    assert result.metrics["step"] == 40 and "perf/images_per_s" in result.metrics


def test_resuming_from_an_older_checkpoint_sets_newer_ones_aside(tmp_path):
    """Trained to step 4, resumed from step 2: step 4 is set aside (not deleted, not picked by
    --resume auto, not counted by pruning) and the log holds each step once."""
    _run(tmp_path, "run.max_steps=4", "run.ckpt_every=2")
    _run(tmp_path, "run.max_steps=3", "run.keep_last=1",
         f"run.resume={tmp_path / 'checkpoints' / Checkpoints.tag(2)}")
    ckpts = Checkpoints(tmp_path, 1)
    assert ckpts.complete_tags() == [Checkpoints.tag(3)] and ckpts.latest().name == Checkpoints.tag(3)
    assert (tmp_path / "checkpoints" / "abandoned" / Checkpoints.tag(4) / COMPLETE_MARKER).is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_fresh_start_in_an_earlier_runs_directory_replaces_its_log_and_sets_its_checkpoints_aside(tmp_path):
    """--resume none over a finished run, as over a run killed before its first checkpoint (which
    --resume auto starts afresh): the log holds the new run's steps once, and the old run's
    checkpoints do not pass for the new run's on the next --resume auto."""
    _run(tmp_path, "run.max_steps=4", "run.ckpt_every=2")
    _run(tmp_path, "run.max_steps=3", "run.resume=none")
    assert Checkpoints(tmp_path, 5).latest().name == Checkpoints.tag(3)
    assert (tmp_path / "checkpoints" / "abandoned" / Checkpoints.tag(4) / COMPLETE_MARKER).is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

def test_a_run_leaves_no_launcher_variables_behind(tmp_path, monkeypatch):
    """After gfm_fast.train(), a train.py or benchmark started from the same process took its RANK
    and MASTER_PORT for a launcher's and failed: the port is this process's rendezvous store's."""
    for key in LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    _run(tmp_path, "run.max_steps=1")
    assert [key for key in LAUNCHER_VARIABLES if key in os.environ] == []

def test_a_metrics_line_torn_by_a_crash_does_not_stop_the_resume(tmp_path):
    """A node that lost power mid-write (or a full disk) leaves half a line, or zeros, at the end
    of metrics.jsonl: the resumed run drops it with the steps it repeats."""
    _run(tmp_path, "run.max_steps=2", "run.ckpt_every=2")
    with open(tmp_path / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "loss/total": 0.5\n\0\0\0\n')
    _run(tmp_path, "run.max_steps=3")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

def test_mask_blocks_larger_than_the_decoder_cell(tmp_path):
    """64-px mask blocks over a 32-px decoder grid: the mask reaches the student upsampled."""
    sizes = ("model.student.img_size=128", "model.teacher.img_size=128", "model.mask_block=64")
    result = _run(tmp_path, "run.max_steps=2", *sizes)
    assert result.metrics["step"] == 2 and math.isfinite(result.metrics["loss/total"])


def test_running_a_finished_run_again(tmp_path):
    """Nothing to train: the result still has the last logged losses, and a model/ lost to a crash
    between the final checkpoint and the export is written."""
    first = _run(tmp_path, "run.max_steps=2")
    shutil.rmtree(tmp_path / "model")
    again = _run(tmp_path, "run.max_steps=2")
    assert again.metrics["step"] == 2 and again.metrics["loss/total"] == first.metrics["loss/total"]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert sorted(_losses(tmp_path)) == [1, 2]


def test_a_run_removes_what_a_killed_final_save_left(tmp_path):
    """A SIGKILL in the export of model/ leaves its hidden staging (a whole model); the next run
    in the directory removes it."""
    _run(tmp_path, "run.max_steps=2")
    stale = tmp_path / ".model.tmp-k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a model")
    _run(tmp_path, "run.max_steps=3")
    assert not stale.exists() and (tmp_path / "model" / "model.safetensors").is_file()


def test_zero_stages_train_alike(tmp_path):
    """One process: every ZeRO stage is the same fp32 optimisation, so the losses agree."""
    losses = {}
    linear = torch.nn.functional.linear
    for stage in (0, 1, 2, 3):
        _run(tmp_path / f"z{stage}", "run.max_steps=3", f"run.zero_stage={stage}")
        losses[stage] = _losses(tmp_path / f"z{stage}")
        assert gfm_fast.load_model(tmp_path / f"z{stage}").gfm_config.swin.embed_dim == 16
    # A run leaves the process as it found it (DeepSpeed's ZeRO-3 may swap F.linear for good).
    assert torch.nn.functional.linear is linear
    for stage in (1, 2, 3):
        for step, loss in losses[stage].items():
            assert loss == pytest.approx(losses[0][step], rel=1e-4, abs=1e-5), (stage, step)
    # The gradient norm is logged at every stage (ZeRO-0 computes it; DeepSpeed's ZeRO optimizers
    # record theirs) and is the same quantity.
    norms = {stage: _metric(tmp_path / f"z{stage}", "train/grad_norm") for stage in (0, 1, 2, 3)}
    assert sorted(norms[0]) == [1, 2, 3]
    for stage in (1, 2, 3):
        for step, norm in norms[stage].items():
            assert norm == pytest.approx(norms[0][step], rel=1e-3), (stage, step)


@pytest.mark.parametrize("steps,ckpt_every,extra",
                         [(6, 3, ()), (18, 16, ()), (4, 2, ("model.student.drop_path_rate=0.3",))],
                         ids=["mid-epoch", "epoch-boundary", "drop-path"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, steps, ckpt_every, extra):
    """16 steps make an epoch of TEST_MODEL: a checkpoint there must resume in the next epoch. Drop-path
    draws from torch's global RNG, which the checkpoint restores too."""
    schedule = (f"run.max_steps={steps}", f"run.ckpt_every={ckpt_every}", *extra)
    _run(tmp_path / "full", *schedule)
    real_save = Checkpoints.save

    def save_then_crash(self, engine, step, *args, **kwargs):
        real_save(self, engine, step, *args, **kwargs)
        raise KeyboardInterrupt("the machine went away right after the first checkpoint")

    monkeypatch.setattr(Checkpoints, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "split", *schedule)
    monkeypatch.setattr(Checkpoints, "save", real_save)
    # Same command again: --resume auto restores model, optimizer, schedule, RNG and data position.
    result = _run(tmp_path / "split", *schedule)
    assert result.metrics["step"] == steps
    full, split = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    for step in range(1, steps + 1):
        assert split[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_exported_model_matches_the_trained_student(tmp_path):
    _run(tmp_path, "run.max_steps=2")
    images = torch.randn(2, 3, 64, 64)
    exported = gfm_fast.extract_features(tmp_path / "model", images)
    # The DeepSpeed module states are the in-training student's weights.
    pretrainer = gfm_fast.load_pretrainer(tmp_path / "checkpoints" / Checkpoints.tag(2))
    direct = gfm_fast.extract_features(pretrainer, images)
    torch.testing.assert_close(exported, direct)


def test_a_run_starts_its_student_from_saved_weights(tmp_path, capsys):
    """model.student_weights (--student-weights): the student, projector and decoder of run A start
    run B, which then barely moves (a learning rate of 1e-12)."""
    _run(tmp_path / "a", "run.max_steps=2")
    still = [f"optim.{key}=1e-12" for key in ("base_lr", "warmup_lr", "min_lr")] + ["optim.weight_decay=0"]
    _run(tmp_path / "b", "run.max_steps=1", f"model.student_weights={tmp_path / 'a'}", *still)
    assert f"student started from {tmp_path / 'a'} (encoder, projector, decoder)" in capsys.readouterr().out
    started = gfm_fast.load_pretrainer(tmp_path / "b").student.state_dict()
    for key, value in gfm_fast.load_pretrainer(tmp_path / "a").student.state_dict().items():
        torch.testing.assert_close(started[key], value, msg=key)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Killed while DeepSpeed writes the step-4 files (Checkpoints.save itself runs): neither the
    COMPLETE marker nor the latest pointer may name the partial checkpoint."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    _run(tmp_path, "run.max_steps=2", "run.ckpt_every=2")

    def crash_midway(self, save_dir, tag=None, **kwargs):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        raise KeyboardInterrupt("killed during save")

    with monkeypatch.context() as patch:
        patch.setattr(DeepSpeedEngine, "save_checkpoint", crash_midway)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "run.max_steps=4", "run.ckpt_every=4")
    assert (tmp_path / "checkpoints" / Checkpoints.tag(4) / "mp_rank_00_model_states.pt").read_bytes() == b"partial"
    assert Checkpoints(tmp_path, 5).latest().name == Checkpoints.tag(2)
    assert (tmp_path / "checkpoints" / "latest").read_text() == Checkpoints.tag(2)
    result = _run(tmp_path, "run.max_steps=4", "run.ckpt_every=4")  # resumes from step 2, replaces the partial
    assert result.metrics["step"] == 4
    assert (tmp_path / "checkpoints" / Checkpoints.tag(4) / COMPLETE_MARKER).is_file()


def test_non_finite_losses_are_skipped_then_fatal(tmp_path, monkeypatch):
    import gfm_fast.data as data

    real = data.make_loader

    class NaNEvery:
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __iter__(self):
            for images in self.loader:
                yield torch.full_like(images, float("nan"), dtype=torch.float32)

    monkeypatch.setattr(data, "make_loader", lambda *a, **k: NaNEvery(real(*a, **k)))
    with pytest.raises(TrainingError, match="3 consecutive non-finite losses"):
        _run(tmp_path, "run.max_steps=5", "run.max_bad_steps=3")


class _BatchPlan:
    """Wraps the loader: counts the batches served and turns the chosen ones (0-based) into NaN images."""

    def __init__(self, loader, nan_batches):
        self.loader, self.nan_batches, self.served = loader, set(nan_batches), 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for images in self.loader:
            if self.served in self.nan_batches:
                images = torch.full_like(images, float("nan"), dtype=torch.float32)
            self.served += 1
            yield images


def _run_with_nan_batches(tmp_path, monkeypatch, nan_batches, *extra):
    """Run with NaN at the given loader batches; returns the batch count served at each optimizer update."""
    import gfm_fast.data as data

    real, plans, updates = data.make_loader, [], []

    def plan_loader(*args, **kwargs):
        plans.append(_BatchPlan(real(*args, **kwargs), nan_batches))
        return plans[-1]

    def record_update(optimizer, args, kwargs):
        # The inner torch optimizer; ZeRO steps it once per param group, so updates are
        # told apart by AdamW's own step count, not by the number of calls.
        count = max(int(state["step"]) for state in optimizer.state.values())
        updates.append((count, plans[-1].served))

    monkeypatch.setattr(data, "make_loader", plan_loader)
    handle = register_optimizer_step_post_hook(record_update)
    try:
        _run(tmp_path, *extra)
    finally:
        handle.remove()
        monkeypatch.setattr(data, "make_loader", real)
    return dict(updates)  # AdamW step -> batches served when it was taken


def test_skipped_step_count_survives_resume(tmp_path, monkeypatch):
    _run_with_nan_batches(tmp_path, monkeypatch, {1}, "run.max_steps=2")  # batch 1 NaN: one step skipped
    assert _metric(tmp_path, "train/bad_steps")[2] == 1
    _run(tmp_path, "run.max_steps=3")
    assert _metric(tmp_path, "train/bad_steps")[3] == 1


def test_only_non_finite_steps_in_a_row_are_fatal(tmp_path, monkeypatch):
    """run.max_bad_steps=2 counts skipped steps in a row: two NaN batches with a good step between
    them are skipped, counted (2 in total) and the run finishes."""
    _run_with_nan_batches(tmp_path, monkeypatch, {1, 3}, "run.max_steps=3", "run.max_bad_steps=2")
    assert _metric(tmp_path, "train/bad_steps") == {1: 0, 2: 1, 3: 2}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_non_finite_second_micro_batch_skips_the_whole_step(tmp_path, monkeypatch, stage):
    """grad_accum=2, NaN in the 2nd micro-batch of the 2nd step (loader batch 3): the step is skipped as a
    whole, the gradients of its 1st micro-batch (batch 2) are discarded, and the optimizer runs after
    exactly 2 micro-batches again. The reference has batches 2 and 3 both NaN, so no finite gradient
    of that step exists to leak; every other batch and every mask (drawn per micro-batch, NaN or
    not) is the same in both runs. A skipped step consumes its grad_accum batches, as a step does."""
    extra = ("run.max_steps=3", "data.batch_size=2", "optim.grad_accum=2", "optim.base_lr=2e-3",
             f"run.zero_stage={stage}")
    late = _run_with_nan_batches(tmp_path / "late", monkeypatch, {3}, *extra)
    early = _run_with_nan_batches(tmp_path / "early", monkeypatch, {2, 3}, *extra)
    # One update per good step, each right after the step's 2nd micro-batch: batches 0-1, 4-5, 6-7.
    assert late == early == {1: 2, 2: 6, 3: 8}, (late, early)
    late_losses, early_losses = _losses(tmp_path / "late"), _losses(tmp_path / "early")
    assert sorted(late_losses) == [1, 2, 3]
    for step in late_losses:
        assert late_losses[step] == pytest.approx(early_losses[step], rel=1e-6, abs=1e-7), step
    bad = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["train/bad_steps"]
           for name in ("late", "early")}
    assert bad == {"late": 1, "early": 1}
    # The 3rd update (batches 6-7) is in the exported weights only; no trace of batch 2 anywhere.
    late_model = gfm_fast.load_model(tmp_path / "late").state_dict()
    early_model = gfm_fast.load_model(tmp_path / "early").state_dict()
    assert late_model.keys() == early_model.keys()
    for name, value in late_model.items():
        torch.testing.assert_close(value, early_model[name], rtol=1e-6, atol=1e-7, msg=name)


def _trained_weight_dtypes(run_dir):
    """The dtypes of the student weights DeepSpeed trains, as its checkpoint holds them (ZeRO 0-2)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    (states,) = Path(run_dir).glob("checkpoints/*/mp_rank_00_model_states.pt")
    with torch.serialization.safe_globals([ZeroStageEnum]):
        module = torch.load(states, map_location="cpu", weights_only=True)["module"]
    return {value.dtype for value in module.values() if value.is_floating_point()}


@pytest.mark.parametrize("precision,stage", [("bf16", 0), ("bf16", 1), ("bf16", 3), ("bf16-mixed", 0),
                                             ("bf16-mixed", 2), ("bf16-mixed", 3)])
def test_bf16_runs_track_fp32(tmp_path, precision, stage):
    """On CPU, DeepSpeed's bf16 path (bf16 weights and gradients, fp32 master weights, our ops in
    bf16) and bf16-mixed (fp32 weights and gradients, the forward under autocast): the losses follow
    the fp32 run's to bf16 rounding, the weights are held in the dtype each mode promises, and the
    export loads as a float32 encoder."""
    _run(tmp_path / "fp32", "run.max_steps=4", "optim.grad_accum=2")
    _run(tmp_path / "bf16", "run.max_steps=4", "optim.grad_accum=2", f"run.precision={precision}",
         f"run.zero_stage={stage}")
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert sorted(bf16) == [1, 2, 3, 4] and any(bf16[s] != fp32[s] for s in fp32)  # really ran in bf16
    # Before any update the runs differ by bf16 rounding only; then the trajectories (bf16 weights,
    # a bf16 teacher) drift apart by a few percent as the loss falls (0.86 -> 0.17 in 4 steps).
    assert bf16[1] == pytest.approx(fp32[1], abs=0.01)
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=0.15, abs=0.01), step
    if stage < 3:  # ZeRO-3 checkpoints hold partitions, not the module
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert _trained_weight_dtypes(tmp_path / "bf16") == {want}
    encoder = gfm_fast.load_model(tmp_path / "bf16")
    assert next(encoder.parameters()).dtype == torch.float32


def test_compiled_run_trains_like_eager_and_shares_checkpoints(tmp_path):
    """run.compile: the losses of eager (inductor reorders float sums), and its checkpoint resumes in
    an eager run (same parameter names)."""
    same_schedule = "optim.schedule_steps=3"
    _run(tmp_path / "eager", "run.max_steps=3", same_schedule)
    torch._dynamo.utils.counters.clear()
    _run(tmp_path / "compiled", "run.max_steps=2", "run.compile=true", same_schedule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # student and teacher really compiled
    assert not torch._dynamo.utils.counters["graph_break"]  # the fused ops are graph nodes, not breaks
    _run(tmp_path / "compiled", "run.max_steps=3", same_schedule)  # eager, from the compiled run's checkpoint
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    assert compiled[1] == pytest.approx(eager[1], rel=1e-4, abs=1e-5)  # same weights: float rounding only
    for step in (2, 3):  # AdamW's normalised update turns rounding-level gradient differences into ~lr-sized ones
        assert compiled[step] == pytest.approx(eager[step], rel=2e-3), step


def test_resume_under_another_zero_stage_or_weight_dtype_is_refused_by_name(tmp_path):
    _run(tmp_path, "run.max_steps=1")
    with pytest.raises(TrainingError, match=r"ZeRO stage: checkpoint 0 vs config 1 \(use run.zero_stage=0\)"):
        _run(tmp_path, "run.max_steps=2", "run.zero_stage=1")
    with pytest.raises(TrainingError, match=r"weights: checkpoint fp32 vs config bf16 \(use run.precision=fp32 or "
                                            r"bf16-mixed\)"):
        _run(tmp_path, "run.max_steps=2", "run.precision=bf16")
    _run(tmp_path, "run.max_steps=2", "run.precision=bf16-mixed")  # fp32 weights either way: resumes
    assert sorted(_losses(tmp_path)) == [1, 2]


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    _run(tmp_path, "run.max_steps=1")
    with pytest.raises(TrainingError, match="model.student"):
        _run(tmp_path, "run.max_steps=2", "model.student.embed_dim=32", "model.student.num_heads=[2,4,8,16]")


def test_python_api_is_the_training_function():
    import gfm_fast.training

    assert gfm_fast.train is gfm_fast.training.train


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    """2 micro-batches of 2 accumulate to the same optimisation as 1 batch of 4 (same samples, masks),
    asked for as optim.grad_accum=2 or as optim.global_batch=4."""
    _run(tmp_path / "big", "run.max_steps=3", "data.batch_size=4", "optim.grad_accum=1", "optim.lr_scale_batch=4")
    _run(tmp_path / "acc", "run.max_steps=3", "data.batch_size=2", "optim.grad_accum=2", "optim.lr_scale_batch=4")
    _run(tmp_path / "global", "run.max_steps=3", "data.batch_size=2", "optim.global_batch=4", "optim.lr_scale_batch=4")
    big = _losses(tmp_path / "big")
    assert sorted(big) == [1, 2, 3]
    for run in ("acc", "global"):
        for step, loss in _losses(tmp_path / run).items():
            assert loss == pytest.approx(big[step], rel=1e-4, abs=1e-5), (run, step)
        assert sorted(_losses(tmp_path / run)) == [1, 2, 3]


def test_every_param_group_steps_with_the_scheduled_lr(tmp_path):
    """The LR each AdamW update really used, in both groups (decayed and not), against the recipe
    written out by hand: global batch 4 scales every LR by 4/512; a 20-step schedule warms up over
    its first 2 steps (10 of 100 epochs) from warmup_lr to base_lr, then the cosine starts at base_lr."""
    used = {}

    def record(optimizer, args, kwargs):
        # By AdamW's own step count: ClippedAdamW.step calls AdamW.step, and once torch has wrapped both
        # classes' step (any AdamW made earlier in the process) the hook runs twice per update.
        count = max(int(state["step"]) for state in optimizer.state.values())
        used[count] = [group["lr"] for group in optimizer.param_groups]

    handle = register_optimizer_step_post_hook(record)
    try:
        _run(tmp_path, "run.max_steps=3", "optim.schedule_steps=20", "optim.epochs=100", "optim.warmup_epochs=10",
             "optim.lr_scale_batch=512", "optim.base_lr=1e-3", "optim.warmup_lr=1e-4", "run.log_every=2")
    finally:
        handle.remove()
    scale = 4 / 512
    want = [1e-4 * scale, (1e-4 + (1e-3 - 1e-4) / 2) * scale, 1e-3 * scale]
    assert sorted(used) == [1, 2, 3] and all(len(lrs) == 2 for lrs in used.values())
    for step, lrs in used.items():
        assert lrs == pytest.approx([want[step - 1]] * 2, rel=1e-9), step
    # logged every 2 steps, and at the last step (3) whatever log_every says
    assert _metric(tmp_path, "lr") == pytest.approx({2: want[1], 3: want[2]}, rel=1e-9)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    _run(tmp_path, "run.max_steps=4", "run.ckpt_every=1", "run.keep_last=2")
    tags = Checkpoints(tmp_path, 2).complete_tags()
    assert tags == [Checkpoints.tag(3), Checkpoints.tag(4)]


def test_saves_cut_short_by_a_kill_are_removed_once_passed(tmp_path):
    """A SIGKILL mid-save (a scheduler's, after its grace period) leaves a checkpoint without its
    marker: never resumed from, never pruned (pruning counts complete ones), GBs each for a real model."""
    _run(tmp_path, "run.max_steps=2", "run.ckpt_every=2")
    for step in (1, 9):  # one the next run passes, one it does not reach
        (tmp_path / "checkpoints" / Checkpoints.tag(step)).mkdir()
        (tmp_path / "checkpoints" / Checkpoints.tag(step) / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    _run(tmp_path, "run.max_steps=4", "run.ckpt_every=2", "optim.schedule_steps=4")  # resumes at 2, saves 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", Checkpoints.tag(2), Checkpoints.tag(4), Checkpoints.tag(9)]


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    _run(tmp_path, "run.max_steps=1")
    states = tmp_path / "checkpoints" / Checkpoints.tag(1) / "mp_rank_00_model_states.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"module": {}, "evil": Payload()}, states)
    with pytest.raises(TrainingError, match="objects other than tensors"):
        _run(tmp_path, "run.max_steps=2")
    assert not (tmp_path / "pwned").exists()
