"""The model, teacher, masks and feature extraction on a GPU, against the same computation on CPU.

The op tests (tests/ops) hold each fused kernel equal to its reference; these check that the
pieces still agree once assembled on the device: fused backends inside the pretrainer, the bf16
teacher, device-side masks and extract_features. They skip without CUDA.
GFM_TEST_DEVICE=cpu runs the same checks with the CPU as the "device", to exercise the tests
themselves on a machine without a GPU.
"""
import os
import threading
import warnings

import pytest
import torch

from gfm_fast import extract_features
from gfm_fast.masking import generate_block_mask
from model_helpers import TINY_BLOCKS, TINY_IMG, random_block_mask, tiny_pretrainer

DEVICE = torch.device(os.environ.get("GFM_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (set GFM_TEST_DEVICE=cpu to dry-run on CPU)"),
              pytest.mark.usefixtures("no_tf32")]  # the fp32 comparisons measure our code, not TF32
FP32_TOL = dict(rtol=2e-4, atol=2e-5)  # TF32 off; reduction order differs between devices/backends


def _pair(backend):
    """A reference-backend pretrainer on CPU and a copy with ``backend`` ops on DEVICE, same weights."""
    torch.manual_seed(0)
    ref = tiny_pretrainer(teacher_dtype="fp32")
    fast = tiny_pretrainer(ops_backend=backend, teacher_dtype="fp32")
    fast.load_state_dict(ref.state_dict())
    return ref, fast.to(DEVICE)


def _batch(batch=3):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(batch, 3, TINY_IMG, TINY_IMG, generator=gen), random_block_mask(batch, count=9)


def _grads(model, loss):
    named = [(n, p) for n, p in model.student.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {n: g.detach().cpu() for (n, _), g in zip(named, grads)}


@pytest.mark.parametrize("backend", ["auto", "cpp", "triton", "reference"])
def test_pretrainer_on_device_equals_cpu_reference(backend):
    if DEVICE.type == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    ref, fast = _pair(backend)
    x, mask = _batch()
    want = ref(x, mask)
    got = fast(x.to(DEVICE), mask.to(DEVICE))
    for name in ("loss", "loss_rec", "loss_feat"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), **FP32_TOL, msg=name)
    want_grads, got_grads = _grads(ref, want.loss), _grads(fast, got.loss)
    for name, g in want_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(got_grads[name] / scale, g / scale, rtol=0, atol=1e-3, msg=name)


def test_bf16_student_tracks_fp32():
    """Training casts the student to bf16 (DeepSpeed bf16): the fused ops there stay near fp32."""
    ref, fast = _pair("auto")
    x, mask = _batch()
    want = ref(x, mask)
    got = fast.to(torch.bfloat16)(x.to(DEVICE, torch.bfloat16), mask.to(DEVICE))
    torch.testing.assert_close(got.loss_rec.float().cpu(), want.loss_rec, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(got.loss_feat.float().cpu(), want.loss_feat, rtol=3e-2, atol=3e-3)
    got.loss.float().backward()
    for name, p in fast.student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name


def test_teacher_on_device_in_its_run_dtype_matches_fp32_cpu():
    """The teacher as a GPU run holds it (teacher_dtype auto, run.precision auto = bf16-mixed: its
    weights cast once to bf16 by build_engine), against the fp32 teacher on CPU. On CUDA its frozen
    window bias then goes to SDPA as a bf16 mask that needs no gradient (cuDNN's kernel on Hopper)."""
    torch.manual_seed(0)
    model = tiny_pretrainer()
    x, _ = _batch()
    want = model.teacher(x)
    teacher = model.teacher.to(DEVICE)
    assert teacher.set_run_precision("bf16-mixed") == torch.bfloat16
    assert teacher.patch_embed.proj.weight.dtype == torch.bfloat16
    got = teacher(x.to(DEVICE))
    assert got.dtype == torch.float32 and got.shape == want.shape
    cos = torch.nn.functional.cosine_similarity(got.cpu(), want, dim=1)
    assert (cos > 0.995).all(), cos


def test_masks_are_drawn_on_the_device():
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    mask = generate_block_mask(16, TINY_IMG, ratio=0.6, generator=gen).blocks
    assert mask.device.type == DEVICE.type and mask.shape == (16, TINY_BLOCKS, TINY_BLOCKS)
    expected = -(-6 * TINY_BLOCKS * TINY_BLOCKS // 10)  # ceil(0.6 * blocks)
    assert (mask.flatten(1).sum(1) == expected).all()
    again = generate_block_mask(16, TINY_IMG, ratio=0.6, generator=torch.Generator(device=DEVICE).manual_seed(5))
    assert torch.equal(mask, again.blocks)


def test_pretrainer_draws_its_own_masks_on_the_device():
    _, fast = _pair("auto")
    x, _ = _batch()
    out = fast(x.to(DEVICE), generator=torch.Generator(device=DEVICE).manual_seed(1))
    assert out.mask.device.type == DEVICE.type and torch.isfinite(out.loss)


def test_extract_features_on_device_equals_cpu():
    torch.manual_seed(0)
    model = tiny_pretrainer()
    x, _ = _batch(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = extract_features(model, x, device="cpu", batch_size=2)
        got = extract_features(model, x, device=DEVICE, batch_size=2)
        maps = extract_features(model, x, device=DEVICE, batch_size=4, stages=[0, 3])
    assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == want.shape
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert (cos > 0.995).all(), cos  # bf16 on CUDA
    assert maps[0].shape[-1] == TINY_IMG // 4 and maps[3].shape[-1] == TINY_IMG // 32


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device")
def test_teacher_cuda_graph_replays_the_eager_forward():
    """run.teacher_cuda_graph: the replayed teacher gives the eager teacher's features for new
    inputs, follows weights loaded in place, and captures again for a new batch shape."""
    torch.manual_seed(0)
    teacher = tiny_pretrainer().teacher.to(DEVICE)
    teacher.set_run_precision("bf16")
    graphed = tiny_pretrainer().teacher.to(DEVICE)
    graphed.load_state_dict(teacher.state_dict())
    graphed.set_run_precision("bf16")
    graphed.use_cuda_graph()
    tol = dict(rtol=1e-2, atol=1e-2)  # bf16; a captured GEMM may pick another algorithm than eager
    for seed, batch in ((1, 3), (2, 3), (3, 5)):
        x = torch.randn(batch, 3, TINY_IMG, TINY_IMG, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        torch.testing.assert_close(graphed(x), teacher(x), **tol)
    kept = graphed(x)
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in teacher.state_dict().items()}
    teacher.load_state_dict(state)
    graphed.load_state_dict(state)  # in place: a new capture, with the new attention bias too
    changed = graphed(x)
    assert (changed - kept).abs().max() > 0.1
    torch.testing.assert_close(changed, teacher(x), **tol)



@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device")
def test_teacher_cuda_graph_captures_while_another_thread_pins_memory():
    """A training run's first step captures the teacher while the DataLoader's pin-memory thread
    allocates pinned host memory for the next batches (cudaHostAlloc). Captured in CUDA's "global"
    mode, such a call from any other thread invalidates the capture and fails in that thread; the
    capture must leave other threads' CUDA calls alone."""
    torch.manual_seed(0)
    teacher = tiny_pretrainer().teacher.to(DEVICE)
    teacher.set_run_precision("bf16-mixed")
    x = torch.randn(3, 3, TINY_IMG, TINY_IMG, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = teacher(x)
    teacher.use_cuda_graph()
    started, stop, errors, pinned = threading.Event(), threading.Event(), [], []

    def pin_like_a_loader():  # every buffer kept: each allocation is a new cudaHostAlloc
        try:
            while not stop.is_set() and len(pinned) < 50_000:
                pinned.append(torch.empty(4096, dtype=torch.uint8).pin_memory())
                started.set()
        except Exception as exc:  # noqa: BLE001 - reported below, with its message
            errors.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=pin_like_a_loader)
    thread.start()
    started.wait()
    try:
        got = teacher(x)  # the first call captures
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(teacher(x), want, rtol=1e-2, atol=1e-2)  # and replays


# Last in the file: the GPU session (benchmarks/gpu_session.sh) runs these tests in file order under a
# deadline, and these two (an inductor compile each) are its slowest cases.
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_compiled_student_on_device_equals_eager(backend):
    """run.compile on the device: the student compiles as one graph (fullgraph; the fused ops are
    opaque custom ops) with the default inductor backend, and its losses and gradients equal eager."""
    if DEVICE.type == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    _, fast = _pair(backend)
    x, mask = _batch()
    x, mask = x.to(DEVICE), mask.to(DEVICE)
    z_t = fast.teacher(x)
    want = fast.student(x, mask, z_t)
    want_grads = _grads(fast, want.loss)
    got = torch.compile(fast.student, fullgraph=True, dynamic=False)(x, mask, z_t)
    got_grads = _grads(fast, got.loss)
    torch.testing.assert_close(got.loss.cpu(), want.loss.cpu(), **FP32_TOL)
    for name, g in want_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(got_grads[name] / scale, g / scale, rtol=0, atol=1e-3, msg=name)
