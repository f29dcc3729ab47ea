"""scripts/install.sh up to its first download, in a copy of the files it reads: what a new user on
another machine meets before pip runs (a too-old Python, a .venv left broken by a failed try); and
scripts/device_wheels.sh with its downloads recorded instead of made."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _repo_copy(tmp_path: Path) -> Path:
    root = tmp_path / "a checkout with spaces"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install.sh", root / "scripts")
    for name in ("setup.py", "requirements.txt"):
        shutil.copy(REPO / name, root)
    shutil.copytree(REPO / "csrc", root / "csrc")
    return root


def _install(root: Path, python: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PIP_"))}
    env.update(PYTHON=python, PIP_NO_INDEX="1")  # never download: pip stops at its first requirement
    return subprocess.run(["bash", str(root / "scripts" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_python_older_than_3_10_is_one_line_before_any_venv(tmp_path):
    root = _repo_copy(tmp_path)
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "Python 3.9.18"; exit 0; }\nexit 1\n')
    old.chmod(0o755)
    result = _install(root, str(old))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"install.sh: needs Python 3.10 or newer; {old} is Python 3.9.18. "
                                     "Set PYTHON, e.g. PYTHON=python3.11 bash scripts/install.sh")
    assert not (root / ".venv").exists()
    missing = _install(root, str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not found." in missing.stderr


def test_a_venv_without_pip_from_a_failed_try_is_made_again(tmp_path):
    """python3 -m venv without python3-venv (Debian) leaves a .venv without pip: a re-run must not take
    it as installed, or `pip` would be whatever pip is on PATH, outside the venv."""
    root = _repo_copy(tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / ".venv")], check=True)
    result = _install(root, sys.executable)
    assert "No matching distribution" in result.stderr  # it got as far as pip, in the venv
    check = subprocess.run([str(root / ".venv" / "bin" / "python"), "-m", "pip", "--version"], capture_output=True,
                           text=True)
    assert check.returncode == 0 and str(root / ".venv") in check.stdout


def _wheel(path: Path, metadata: str = "") -> None:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(path.name.split("-")[0] + "-x.dist-info/METADATA", metadata)


def test_device_wheels_fetch_the_pydantic_core_that_pydantic_pins_and_one_of_each(tmp_path):
    """The newest pydantic-core is often ahead of pydantic's pin, and a re-run after a release leaves
    older wheels that gpu_session.sh would install beside the new ones (pip refuses two versions)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "device_wheels.sh", root / "scripts")
    whl = root / ".whl"
    whl.mkdir()
    _wheel(whl / "pydantic-2.9.2-py3-none-any.whl", "Requires-Dist: pydantic-core==2.23.4\n")
    _wheel(whl / "pydantic-2.11.7-py3-none-any.whl", "Name: pydantic\nRequires-Dist: pydantic-core==2.33.2\n")
    for core in ("2.23.4", "2.35.1"):
        _wheel(whl / f"pydantic_core-{core}-cp312-cp312-manylinux_2_17_x86_64.whl")
    (whl / "deepspeed-0.19.8-py3-none-any.whl").write_text("")  # built before: not rebuilt
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "pip_calls"
    (bin_dir / "python3").write_text(  # python3 -m pip ...: recorded, not run; anything else: the real one
        f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$@" >> "{calls}"; exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(root / "scripts" / "device_wheels.sh")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    downloads = calls.read_text().splitlines()
    assert downloads[-1].endswith("-d .whl pydantic-core==2.33.2"), downloads
    assert "pydantic-core" not in downloads[0] and "pydantic>=2.11" in downloads[0]
    assert sorted(p.name for p in whl.glob("pydantic*")) == ["pydantic-2.11.7-py3-none-any.whl"]


def test_tests_before_install_is_one_line(tmp_path):
    root = tmp_path / "fresh checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "test.sh", root / "scripts")
    result = subprocess.run(["bash", str(root / "scripts" / "test.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"test.sh: no .venv in {root}: run bash scripts/install.sh first"
