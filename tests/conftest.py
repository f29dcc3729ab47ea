import os
import signal

# Triton runs its kernels in the interpreter on CPU; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

# A suite started in the background by a script (`cmd &` in a non-interactive shell, nohup)
# inherits SIGINT ignored, and so would every process it starts; the Ctrl-C tests need the
# terminal's SIGINT, which raises KeyboardInterrupt here and is not ignored in the trainers.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Likewise SIGHUP under nohup: the trainers would keep it ignored (as nohup asks), and the hangup
# tests need it delivered.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

import pytest  # noqa: E402
import torch  # noqa: E402

from gfm_fast.training.distributed import LAUNCHER_VARIABLES  # noqa: E402

# The suite's training runs are one process each (or launch their own): a launcher's or a SLURM
# allocation's variables inherited from the shell (RANK, SLURM_NTASKS=4 under salloc or sbatch)
# would make every in-process run wait for ranks that never start. GFM_FAST_BACKEND=reference
# would make backend="auto" the reference, and the tests of auto against it compare it with itself.
for _key in [key for key in os.environ
             if key in LAUNCHER_VARIABLES or key.startswith("SLURM_") or key == "GFM_FAST_BACKEND"]:
    del os.environ[_key]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_tf32():
    """On GPUs, fp32 matmuls and convolutions at full fp32 precision (no TF32 in cuBLAS/cuDNN), so an
    fp32 tolerance measures our kernels, not the reference's TF32 rounding."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
