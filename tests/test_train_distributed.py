"""Runs of two processes (the deepspeed launcher, gloo on CPU), and resuming them at another world size."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import gfm_fast
from gfm_fast import run_dir
from gfm_fast.config import TrainConfig
from gfm_fast.training import COMPLETE_MARKER, Checkpoints, TrainingError, checkpoints
from gfm_fast.training.checkpoints import global_batch_change, needs_resharding, reshard
from gfm_fast.training.distributed import free_port, init_distributed, shm_allreduce_buffer

from train_helpers import REPO, TEST_MODEL, TRAIN_PY
from train_helpers import losses as _losses
from train_helpers import run_tiny as _run
from train_helpers import subprocess_env as _env


def _launch_two(out, port, *args):
    """train.py under the deepspeed launcher, two processes on this CPU."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(TRAIN_PY), *TEST_MODEL, "--output-dir", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_gloo_run(tmp_path, stage):
    port = free_port()
    # DeepSpeed's CPU all-reduce buffers of this port (66 MB each): a leftover of an older run goes first.
    buffers = [shm_allreduce_buffer(rank, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    for path in buffers:
        Path(path).unlink(missing_ok=True)
    proc = _launch_two(tmp_path, port, "--max-steps", "3", "--zero-stage", str(stage))
    assert "2 process(es)" in proc.stderr + proc.stdout
    assert not [path for path in buffers if os.path.exists(path)], "the run left its shm buffers in RAM"
    assert len(_losses(tmp_path)) == 3
    assert (tmp_path / "checkpoints" / Checkpoints.tag(3) / COMPLETE_MARKER).is_file()
    model = gfm_fast.load_model(tmp_path)
    assert model.gfm_config.swin.embed_dim == 16


def test_two_process_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Per-rank loader positions and mask RNGs survive a resume (ZeRO-2, 2 processes)."""
    port = free_port()

    def launch(out, steps):
        _launch_two(out, port, "--max-steps", str(steps), "--zero-stage", "2", "optim.schedule_steps=4",
                    "run.ckpt_every=2")

    launch(tmp_path / "full", 4)
    launch(tmp_path / "split", 2)  # the first chunk of the same 4-step schedule
    launch(tmp_path / "split", 4)  # resumes at step 2
    full, split = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    for step in range(1, 5):
        assert split[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step




def test_a_zero_checkpoint_resumes_at_another_world_size(tmp_path):
    """Two processes train 2 steps, then one process resumes to step 4 with twice the accumulation
    (the same global batch). ZeRO-2 and ZeRO-3 split the weights and Adam moments over the two ranks,
    so their checkpoints are converted for one (DeepSpeed's universal layout); ZeRO-0 keeps them whole
    and is the reference: the same fp32 optimisation, so the resumed losses agree. Step 4's loss
    depends on the moments and step count the checkpoint restored, not only on its weights; the
    strong weight decay makes it depend on which parameters decay (DeepSpeed's ZeRO-3 loader
    mixes up both, ``checkpoints._load_universal``)."""
    port = free_port()
    losses = {}
    for stage in (0, 2, 3):
        out = tmp_path / f"z{stage}"
        common = ["optim.schedule_steps=4", "run.ckpt_every=2", "optim.fused=false", "optim.weight_decay=20",
                  f"run.zero_stage={stage}"]
        _launch_two(out, port, "--max-steps", "2", *common)
        assert needs_resharding(out / "checkpoints" / Checkpoints.tag(2), 1) == (stage > 0)
        _run(out, "run.max_steps=4", "optim.grad_accum=2", *common)
        losses[stage] = _losses(out)
        assert sorted(losses[stage]) == [1, 2, 3, 4]
        assert (out / "checkpoints" / Checkpoints.tag(4) / COMPLETE_MARKER).is_file()
        assert not (out / "checkpoints" / run_dir.UNIVERSAL_DIR).exists()  # the conversion is removed
    for stage in (2, 3):
        for step in (3, 4):
            assert losses[stage][step] == pytest.approx(losses[0][step], rel=1e-4, abs=1e-5), (stage, step)


def test_a_resume_at_another_global_batch_says_what_changes_and_how_to_keep_it():
    saved = {"data": {"batch_size": 4}, "optim": {"grad_accum": 1}}
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.optim.grad_accum = 4, 1
    message = global_batch_change(saved, 8, cfg, 4)
    assert "global batch 32 (8 ranks x 4 x accumulation 1), this one at 16" in message
    assert message.endswith("set optim.grad_accum=2 (or optim.global_batch=32)")
    cfg.optim.grad_accum = 2
    assert global_batch_change(saved, 8, cfg, 4) is None
    cfg.data.batch_size, cfg.optim.grad_accum = 3, 1
    assert "ranks x batch x accumulation = 32" in global_batch_change(saved, 8, cfg, 4)
    assert global_batch_change(None, 8, cfg, 4) is None  # a checkpoint without its config


def test_a_failed_conversion_is_one_error_naming_the_checkpoint_and_the_fix(tmp_path, monkeypatch):
    tag = tmp_path / "checkpoints" / Checkpoints.tag(2)
    tag.mkdir(parents=True)
    for rank in (0, 1):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    init_distributed("cpu")
    failed = types.SimpleNamespace(returncode=1, stdout="*** 1. Extracting ZeRO fragments\nAssertionError: no space\n")
    monkeypatch.setattr(checkpoints.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(TrainingError, match=r"could not convert checkpoint .*step_00000002 for 1 ranks .*"
                                            r"AssertionError: no space\); resume with the 2 ranks that wrote it"):
        reshard(tag, 0, tmp_path / "run" / "checkpoints" / ".universal")
