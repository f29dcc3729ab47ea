"""How a run stops and starts: scheduler and terminal signals, SLURM tasks, the run directory's
pointers, and the training step that the loop, benchmarks and tests share. train.py's one-line
errors: test_train_cli.py.

Signal tests run the real ``python gfm_fast/train.py`` in its own session with two loader
workers and signal the whole process group, as a scheduler (every process of the job) or a
terminal (Ctrl-C) does.
"""
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import gfm_fast
from gfm_fast.config import load_config
from gfm_fast.training import Checkpoints, main
from gfm_fast.errors import ConfigError
from gfm_fast.training.distributed import dist_backend, first_slurm_host, free_port, launcher_env

from train_helpers import REPO, TEST_MODEL, TRAIN_PY, losses, run_tiny, subprocess_env

# Trains until stopped; a fixed schedule length, so that a shorter resumed run has the same LRs.
UNTIL_STOPPED = ["--max-steps", "100000", "optim.schedule_steps=100000", "data.num_workers=2"]


_sessions = []  # process groups a test started, killed at its end whatever happened


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    yield
    while _sessions:
        try:
            os.killpg(_sessions.pop(), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session(cmd, log, env=None, **popen):
    """``cmd`` in a session (process group) of its own, output to ``log``."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or subprocess_env(), cwd=REPO,
                            start_new_session=True, **popen)
    _sessions.append(proc.pid)
    return proc


def _start(run_dir, log, *extra, env=None, **popen):
    cmd = [sys.executable, str(TRAIN_PY), "--output-dir", str(run_dir), *TEST_MODEL, *UNTIL_STOPPED, *extra]
    return _session(cmd, log, env, **popen)


def _wait_for_logged_steps(proc, run_dir, log_file, count, timeout=300):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log_file.read_text()[-3000:]
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {count} logged steps in {timeout} s: {log_file.read_text()[-3000:]}")


def _group(pgid):
    """The live (not zombie) processes of process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _wait_until_gone(pgid, timeout=15):
    deadline = time.time() + timeout
    while _group(pgid) and time.time() < deadline:
        time.sleep(0.2)
    return _group(pgid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1],
                         ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_to_the_process_group_saves_and_resumes_exactly(tmp_path, signum):
    run_dir, log_file = tmp_path / "run", tmp_path / "train.log"
    with open(log_file, "w") as log:
        proc = _start(run_dir, log)
        _wait_for_logged_steps(proc, run_dir, log_file, 3)
        assert len(_group(proc.pid)) >= 3  # the trainer and its two loader workers, all signalled below
        start = time.time()
        os.killpg(proc.pid, signum)
        code = proc.wait(timeout=120)
    elapsed = time.time() - start
    output = log_file.read_text()
    assert code == 128 + signum, output[-3000:]  # 143, 130, 138: as a shell reports them
    assert elapsed < 30, elapsed  # DeepSpeed's launcher SIGKILLs what is left after 30 s
    assert "Traceback" not in output and "DataLoader worker" not in output, output[-3000:]
    assert not _wait_until_gone(proc.pid), "processes of the run outlived it"
    reached = max(losses(run_dir))
    latest = Checkpoints(run_dir, 5).latest()
    assert latest is not None and latest.name == Checkpoints.tag(reached)  # the step reached, not a periodic one
    assert (run_dir / "checkpoints" / "latest").read_text() == latest.name
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert f"saved checkpoint {latest}" in output
    # The printed command resumes the run; two more steps land where an uninterrupted run does.
    command = shlex.split(re.search(r"Resume with: (.*)", output).group(1))
    assert command[:2] == ["python", "gfm_fast/train.py"] and command[-2:] == ["--resume", "auto"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(command[2:] + ["--max-steps", str(reached + 2)]) == 0
    run_tiny(tmp_path / "reference", f"run.max_steps={reached + 2}", *UNTIL_STOPPED[2:])
    resumed, reference = losses(run_dir), losses(tmp_path / "reference")
    assert sorted(resumed) == list(range(1, reached + 3))
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_a_hangup_saves_though_the_terminal_is_gone(tmp_path):
    """A dropped SSH session: the run writes to a terminal that no longer exists (writes fail with
    EIO) and its group gets SIGHUP. It saves the step it reached and exits with 129."""
    run_dir, log_file = tmp_path / "run", tmp_path / "terminal.log"
    master, terminal = os.openpty()
    hung_up = threading.Event()

    def terminal_screen():  # what the user saw, until the connection dropped
        with open(log_file, "wb") as screen:
            while not hung_up.is_set():
                if select.select([master], [], [], 0.1)[0]:
                    screen.write(os.read(master, 65536))
                    screen.flush()

    reader = threading.Thread(target=terminal_screen)
    reader.start()
    proc = _start(run_dir, terminal)
    os.close(terminal)
    try:
        _wait_for_logged_steps(proc, run_dir, log_file, 3)
    finally:
        hung_up.set()
        reader.join()
        os.close(master)
    os.killpg(proc.pid, signal.SIGHUP)
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    assert not _wait_until_gone(proc.pid), "processes of the run outlived it"
    latest = Checkpoints(run_dir, 5).latest()
    assert latest is not None and latest.name == Checkpoints.tag(max(losses(run_dir)))
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_under_nohup_a_hangup_is_ignored(tmp_path):
    run_dir, log_file = tmp_path / "run", tmp_path / "train.log"
    with open(log_file, "w") as log:
        proc = _start(run_dir, log, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup
        _wait_for_logged_steps(proc, run_dir, log_file, 3)
        os.killpg(proc.pid, signal.SIGHUP)
        _wait_for_logged_steps(proc, run_dir, log_file, max(losses(run_dir)) + 3)  # trains on
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log_file.read_text()[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_or_a_hangup_under_the_deepspeed_launcher_saves(tmp_path, signum):
    """The quick start's ``deepspeed gfm_fast/train.py``: Ctrl-C reaches the trainer, and the
    launcher then sends it SIGTERM as well; the two are one request, answered with a checkpoint.
    A hangup ends the launcher (it has no handler for it); its trainer saves all the same."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    run_dir, log_file = tmp_path / "run", tmp_path / "train.log"
    cmd = [str(deepspeed), "--num_gpus", "1", "--master_port", str(free_port()), str(TRAIN_PY), "--output-dir",
           str(run_dir), *TEST_MODEL, *UNTIL_STOPPED]
    with open(log_file, "w") as log:
        proc = _session(cmd, log)
        _wait_for_logged_steps(proc, run_dir, log_file, 3)
        os.killpg(proc.pid, signum)
        proc.wait(timeout=120)  # the launcher's own status is 1 (or SIGHUP's), whatever its trainers return
    assert not _wait_until_gone(proc.pid, timeout=60), "processes of the run outlived it"
    output = log_file.read_text()
    latest = Checkpoints(run_dir, 5).latest()
    assert latest is not None and f"saved checkpoint {latest}" in output, output[-3000:]
    assert f"exiting with {128 + signum}" in output, output[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_newest_checkpoint(tmp_path):
    run_dir, log_file = tmp_path / "run", tmp_path / "train.log"
    with open(log_file, "w") as log:
        proc = _start(run_dir, log, "run.ckpt_every=2")
        _wait_for_logged_steps(proc, run_dir, log_file, 3)  # step 2's periodic checkpoint is complete
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)  # the first one is handled (two pending SIGINTs would make one call)
        start = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    # Interrupted as without the handler (KeyboardInterrupt), not after a save (130).
    assert code == -signal.SIGINT, (code, log_file.read_text()[-3000:])
    assert time.time() - start < 10
    assert not _wait_until_gone(proc.pid), "processes of the run outlived it"
    latest = Checkpoints(run_dir, 5).latest()
    assert latest is not None
    step = int(latest.name.split("_")[1])
    result = run_tiny(run_dir, f"run.max_steps={step + 1}", *UNTIL_STOPPED[2:])  # --resume auto
    assert result.metrics["step"] == step + 1


def test_srun_tasks_train_without_a_launcher(tmp_path):
    """Two tasks as ``srun --ntasks 2`` starts them: rank, world size and master from SLURM's variables
    (the port a batch script may set: the one derived from the job id may be taken here)."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**subprocess_env(), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "123", "MASTER_PORT": str(port)}
        cmd = [sys.executable, str(TRAIN_PY), "--output-dir", str(tmp_path), "--max-steps", "2", *TEST_MODEL]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=REPO))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 process(es)" in outputs[0]
    assert sorted(losses(tmp_path)) == [1, 2]
    assert Checkpoints(tmp_path, 5).latest().name == Checkpoints.tag(2)


def test_launcher_variables_from_slurm():
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert launcher_env(slurm) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert launcher_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})["MASTER_ADDR"] == "head"
    assert launcher_env({**slurm, "RANK": "0"}) == {}  # a launcher's variables win
    # `srun -n 4` inside an 8-task allocation: the step's 4 tasks are the world, not the job's 8
    assert launcher_env({**slurm, "SLURM_STEP_NUM_TASKS": "4"})["WORLD_SIZE"] == "4"
    single = launcher_env({})
    assert (single["RANK"], single["WORLD_SIZE"], single["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    # One process rendezvous with itself: a MASTER_PORT the shell exports (a job script's, held by
    # another run) or a MASTER_ADDR elsewhere are not its own.
    exported = {"MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    for environ in (exported, {**slurm, **exported, "SLURM_NTASKS": "1"}):
        single = launcher_env(environ)
        assert single["MASTER_ADDR"] == "127.0.0.1" and single["MASTER_PORT"] != "29500"


def test_dist_backend_defaults_and_its_override(tmp_path):
    """gloo on CPU, NCCL on GPU; GFM_DIST_BACKEND picks gloo on a GPU (one process whose NCCL does
    not start, as benchmarks/gpu_session.sh checks), and a value that cannot work is one error line."""
    assert (dist_backend("cpu", {}), dist_backend("cuda", {})) == ("gloo", "nccl")
    assert dist_backend("cuda", {"GFM_DIST_BACKEND": "gloo"}) == "gloo"
    with pytest.raises(ConfigError, match="GFM_DIST_BACKEND='mpi' .* use one of nccl, gloo"):
        dist_backend("cuda", {"GFM_DIST_BACKEND": "mpi"})
    with pytest.raises(ConfigError, match="needs GPUs"):
        dist_backend("cpu", {"GFM_DIST_BACKEND": "nccl"})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--output-dir", str(run_dir), *TEST_MODEL, "--max-steps",
                           "1"], capture_output=True, text=True, env={**subprocess_env(), "GFM_DIST_BACKEND": "mpi"},
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]  # a user error past the config checks (loop.main)
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: GFM_DIST_BACKEND='mpi'")
    assert not run_dir.exists()


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("gpu[07-09,12],cpu1", "gpu07"),
                                            ("a[3,5]-ib", "a3-ib"), ("n[001-004]", "n001")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_latest_follows_checkpoints_set_aside(tmp_path):
    """Set aside step 4 (as a resume from step 2 does): ``latest`` names step 2 at once, and
    load_model of the checkpoints directory reads step 2, before any new save."""
    run_tiny(tmp_path, "run.max_steps=4", "run.ckpt_every=2")
    checkpoints = Checkpoints(tmp_path, 5)
    assert (checkpoints.root / "latest").read_text() == Checkpoints.tag(4)
    checkpoints.set_aside_after(2)
    assert (checkpoints.root / "latest").read_text() == Checkpoints.tag(2)
    loaded = gfm_fast.load_model(checkpoints.root).state_dict()
    step2 = gfm_fast.load_model(checkpoints.root / Checkpoints.tag(2)).state_dict()
    step4 = gfm_fast.load_model(checkpoints.root / "abandoned" / Checkpoints.tag(4)).state_dict()
    assert all(torch.equal(loaded[k], step2[k]) for k in step2)
    assert not all(torch.equal(loaded[k], step4[k]) for k in step4)


# --------------------------------------------------------------------------------------------
# The training step, with an engine a caller builds
# --------------------------------------------------------------------------------------------

def _tiny_setup(*extra):
    from gfm_fast.models.pretrainer import GFMPretrainer
    from gfm_fast.training import build_engine, init_distributed, resolve_precision

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), TEST_MODEL + ["optim.clip_grad=0.5", *extra])
    init_distributed("cpu")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random teacher
        pretrainer = GFMPretrainer(cfg.model)
        reference = GFMPretrainer(cfg.model)
    reference.load_state_dict(pretrainer.state_dict())
    engine, optimizer = build_engine(cfg, pretrainer, torch.device("cpu"), resolve_precision(cfg, "cpu"))
    return cfg, pretrainer, engine, optimizer, reference


def test_train_step_is_one_adamw_step_through_the_pretrainer():
    """train_step with an engine from build_engine == plain PyTorch: the pretrainer's forward with
    the same mask, backward, clipping by the global norm, torch's AdamW with the same groups."""
    from gfm_fast.models.pretrainer import param_groups
    from gfm_fast.training import train_step

    cfg, pretrainer, engine, optimizer, reference = _tiny_setup()
    images = torch.randn(4, 3, 64, 64)
    result = train_step(engine, pretrainer, lambda: images, 1, generator=torch.Generator().manual_seed(3),
                        measure_grad_norm=True)
    assert result.applied and not result.stop

    ref_opt = torch.optim.AdamW(param_groups(reference.student, cfg.optim.weight_decay), lr=cfg.optim.base_lr,
                                betas=cfg.optim.betas, eps=cfg.optim.eps)
    out = reference(images, generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.student.parameters(), cfg.optim.clip_grad)
    ref_opt.step()
    torch.testing.assert_close(result.sums[0], out.loss.detach())
    torch.testing.assert_close(result.grad_norm, norm)
    assert torch.equal(result.mask, out.mask)
    trained = dict(pretrainer.student.named_parameters())
    for name, param in reference.student.named_parameters():
        torch.testing.assert_close(trained[name], param, rtol=1e-5, atol=1e-6, msg=name)


def test_train_step_accumulates_micro_batches_into_one_adamw_step():
    """grad_accum=2: one optimizer step on the mean of the two micro-batches' losses (plain PyTorch
    as the reference), loss sums over both and their mean in step_metrics; a NaN in the first
    micro-batch skips the whole step."""
    from gfm_fast.models.pretrainer import param_groups
    from gfm_fast.training import train_step
    from gfm_fast.training.step import step_metrics

    cfg, pretrainer, engine, _, reference = _tiny_setup("optim.grad_accum=2")
    batches = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)]
    result = train_step(engine, pretrainer, iter(batches).__next__, 2, generator=torch.Generator().manual_seed(3))
    assert result.applied and result.micro_batches == 2

    ref_opt = torch.optim.AdamW(param_groups(reference.student, cfg.optim.weight_decay), lr=cfg.optim.base_lr,
                                betas=cfg.optim.betas, eps=cfg.optim.eps)
    generator = torch.Generator().manual_seed(3)
    outs = [reference(images, generator=generator) for images in batches]
    ((outs[0].loss + outs[1].loss) / 2).backward()
    torch.nn.utils.clip_grad_norm_(reference.student.parameters(), cfg.optim.clip_grad)
    ref_opt.step()
    total = outs[0].loss.detach() + outs[1].loss.detach()
    torch.testing.assert_close(result.sums[0], total)
    assert step_metrics(result, engine)["loss/total"] == pytest.approx(total.item() / 2, rel=1e-6)
    trained = dict(pretrainer.student.named_parameters())
    for name, param in reference.student.named_parameters():
        torch.testing.assert_close(trained[name], param, rtol=1e-5, atol=1e-6, msg=name)

    before = {k: v.clone() for k, v in pretrainer.student.state_dict().items()}
    nan_first = iter([torch.full((2, 3, 64, 64), float("nan")), torch.randn(2, 3, 64, 64)])
    assert not train_step(engine, pretrainer, nan_first.__next__, 2).applied
    assert all(torch.equal(before[k], v) for k, v in pretrainer.student.state_dict().items())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_skips_a_non_finite_step_and_reports_a_stop(precision):
    """A NaN step changes no weight and leaves no gradient behind (bf16 keeps fp32 gradient copies
    in its optimizer); the next step trains normally."""
    from gfm_fast.training import train_step

    _, pretrainer, engine, _, _ = _tiny_setup(f"run.precision={precision}")
    before = {k: v.clone() for k, v in pretrainer.student.state_dict().items()}
    nan_images = torch.full((4, 3, 64, 64), float("nan"))
    result = train_step(engine, pretrainer, lambda: nan_images, 1, stop_signal=lambda: signal.SIGTERM)
    assert not result.applied and result.stop == signal.SIGTERM
    after = pretrainer.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    result = train_step(engine, pretrainer, lambda: torch.randn(4, 3, 64, 64), 1)
    assert result.applied and not result.stop
    after = pretrainer.student.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("precision,stage,warns", [("bf16", 0, True), ("bf16", 1, False), ("bf16-mixed", 0, False)])
def test_build_engine_warns_where_deepspeed_syncs_once_per_parameter(recwarn, precision, stage, warns):
    """DeepSpeed's 16-bit weights at ZeRO-0 take its unfused optimizer, which reads every gradient
    back to the host; the user hears of it, and of the modes that avoid it."""
    _tiny_setup(f"run.precision={precision}", f"run.zero_stage={stage}")
    said = [str(w.message) for w in recwarn if "unfused 16-bit optimizer" in str(w.message)]
    assert len(said) == warns
    if warns:
        assert "run.precision=bf16-mixed" in said[0] and "run.zero_stage>=1" in said[0]
