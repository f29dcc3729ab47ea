"""train.py's errors a user can fix: one ``error:`` line and exit status 2, before any work where
the mistake is in the command line or config (nothing written, no minutes spent first)."""
import subprocess
import sys
import tarfile
import warnings

from gfm_fast.training import build_config, check_paths, main

from train_helpers import TEST_MODEL, TRAIN_PY, run_tiny, subprocess_env


def test_cli_names_a_shard_that_is_not_a_tar(tmp_path, capsys):
    fake = tmp_path / "shard-000000.tar"
    fake.write_bytes(b"\x89PNG not a tar archive" * 100)
    assert main(["--data", str(fake), "--output-dir", str(tmp_path / "run"), *TEST_MODEL]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "data.shards" in line and str(fake) in line and "not a tar" in line
    real = tmp_path / "real.tar"
    with tarfile.open(real, "w") as tar:
        tar.add(fake, arcname="sample.png")
    check_paths(build_config("tiny", [f"data.shards={real}"]))  # a real tar passes


def test_cli_prints_a_training_error_as_one_line(tmp_path, capsys):
    run_tiny(tmp_path, "run.max_steps=1")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["--output-dir", str(tmp_path), "--max-steps", "2", *TEST_MODEL, "model.student.embed_dim=32",
                     "model.student.num_heads=[2,4,8,16]"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different architecture" in errors[0] and "model.student" in errors[0]


def test_cli_names_a_missing_teacher_file_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--teacher-weights", str(tmp_path / "none.pth")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    assert "model.teacher_weights" in proc.stderr and "--teacher-weights" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_names_missing_student_weights_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--student-weights", str(tmp_path / "gfm.pth"),
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: model.student_weights (--student-weights): {tmp_path / 'gfm.pth'} does not exist")
    assert not (tmp_path / "run").exists()


def test_cli_reports_missing_shards_in_one_line_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--data", str(tmp_path / "nowhere"), "--output-dir",
                           str(tmp_path / "run"), *TEST_MODEL], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "data.shards" in line and str(tmp_path / "nowhere") in line
    assert not (tmp_path / "run").exists()


def test_cli_rejects_a_resume_path_without_a_checkpoint_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--resume", str(tmp_path / "old_run"), "--output-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --resume {tmp_path / 'old_run'}: no complete checkpoint there")
    assert not (tmp_path / "run").exists()


def test_cli_rejects_an_unknown_source_weight_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN_PY), 'data.source_weights={"naip":0.5}', "--output-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == "error: data.source_weights names unknown source(s) ['naip']; the shards hold ['neon_sites', " \
                   "'neon_yell']"
    assert not (tmp_path / "run").exists()


def test_cli_rejects_an_output_dir_it_cannot_make_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--output-dir", str(tmp_path / "a_file" / "run")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"error: run.output_dir (--output-dir) {tmp_path / 'a_file' / 'run'}: {tmp_path / 'a_file'} is "
                    f"a file, not a directory; choose another one")


def test_cli_names_the_extensions_folder_an_unwritable_home_blocks(tmp_path):
    """DeepSpeed's CPU backend compiles an op under ~/.cache on first use: a read-only home (some
    clusters, containers) gets one line naming the fix, not DeepSpeed's traceback."""
    (tmp_path / "home").write_text("")  # a file where the home folder would be
    env = {**subprocess_env(), "HOME": str(tmp_path / "home")}
    env.pop("TORCH_EXTENSIONS_DIR", None)
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--output-dir", str(tmp_path / "run"), "run.max_steps=1",
                           "run.device=cpu", *TEST_MODEL], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: DeepSpeed builds its CPU communication op in ") and "TORCH_EXTENSIONS_DIR" in line


def test_cli_rejects_a_missing_eval_set_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "run.eval_every=2", f"run.eval_data={tmp_path / 'nope'}",
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"error: run.eval_data {tmp_path / 'nope'} does not exist; pass a labelled folder "
                    f"(root/<class>/<image>) or shards, or run.eval_every=0")
    assert not (tmp_path / "run").exists()


def test_cli_prints_a_backend_this_device_lacks_in_one_line(tmp_path):
    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)  # the interpreter would run the Triton kernels on CPU
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "model.ops_backend=triton", "--output-dir",
                           str(tmp_path / "run"), "run.max_steps=1", *TEST_MODEL], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: masked_patch_embed: backend='triton' needs a CUDA")


def test_cli_rejects_a_bad_config_before_any_work():
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "run.max_stepz=3"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'run.max_stepz'" in proc.stderr
