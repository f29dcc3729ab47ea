import pytest
import torch


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    """On GPUs the fp32 reference runs at fp32 precision too (no TF32 in cuBLAS/cuDNN), so the fp32
    tolerance measures the kernels, not the reference's TF32 rounding."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
