import pytest


@pytest.fixture(autouse=True)
def _exact_fp32_reference(no_tf32):
    """Every op test compares against an fp32 reference without TF32 (see tests/conftest.py)."""
    yield
