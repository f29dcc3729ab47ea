"""How the Triton kernels are built, checked without a GPU: eps a constexpr (exact fp64 on the
GPU), the interpreter's numpy guard, fp32 dots following torch's matmul precision, autotune configs
pruned to the card's shared memory, and every kernel compiled for an H100 (sm_90) by Triton's own
compiler, so GPU-only compile errors surface here instead of on the first GPU run.
Values and gradients of the kernels: tests/ops/test_triton_kernels.py.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

from gfm_fast.kernels import cosine_distillation as cos_kernels  # noqa: E402
from gfm_fast.kernels import decoder_l1_loss as dec_kernels  # noqa: E402
from gfm_fast.kernels import masked_patch_embed as embed_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")

# --------------------------------------------------------------------------- GPU-only semantics

def _kernel_parameters():
    """(kernel name, parameter name, annotation) of every @triton.jit function (JIT or interpreted)."""
    for module in (cos_kernels, dec_kernels, embed_kernels):
        for name, obj in vars(module).items():
            jitted = obj.fn if isinstance(obj, triton.runtime.Autotuner) else obj
            if type(jitted).__name__ not in ("JITFunction", "InterpretedFunction"):
                continue
            for param in inspect.signature(jitted.fn).parameters.values():
                yield f"{module.__name__}.{name}", param.name, str(param.annotation)


def test_eps_is_a_constexpr_in_every_kernel():
    """On a GPU a Python float kernel argument arrives as fp32, so a runtime eps makes fp64 results
    inexact; the interpreter keeps the Python float, so the fp64 value tests only see this on a GPU."""
    kernels = []
    for kernel, param, annotation in _kernel_parameters():
        if param.lower() == "eps":
            assert annotation.endswith("constexpr"), f"{kernel}: eps is a runtime (fp32 on the GPU) argument"
            kernels.append(kernel)
    assert len(kernels) == 4, kernels  # cosine forward and backward, embed forward, decoder compaction


# --------------------------------------------------------------------------- interpreter guard

@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.8.0", "2.5.1", False)])
def test_interpreter_refuses_the_numpy_it_cannot_run_with(monkeypatch, triton_version, numpy_version, broken):
    """Triton < 3.7's interpreter fails every kernel with a runtime loop bound under numpy >= 2.4;
    importing the kernels names the pair and the fix instead."""
    import numpy

    from gfm_fast.kernels import _common

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if broken:
        with pytest.raises(ImportError, match=r"Triton 3.6.0 interpreter .* numpy 2.4.6 .*install 'numpy<2.4' or "
                                              r"triton>=3.7"):
            _common._check_interpreter_numpy()
    else:
        _common._check_interpreter_numpy()


# --------------------------------------------------------------------------- fp32 dot precision

@pytest.fixture
def restore_matmul_precision():
    """Puts the setting back through the legacy flag last: reading allow_tf32 (as tests/conftest.py
    does on GPUs) raises once the new API was the last one used."""
    matmul = torch.backends.cuda.matmul
    saved_global, saved_matmul = torch.backends.fp32_precision, matmul.allow_tf32
    yield
    torch.backends.fp32_precision = saved_global
    matmul.allow_tf32 = saved_matmul


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: allow_tf32 only")
@pytest.mark.parametrize("setting,want", [
    ({"allow_tf32": True}, "tf32"), ({"allow_tf32": False}, "ieee"),
    ({"fp32_precision": "tf32"}, "tf32"), ({"fp32_precision": "ieee"}, "ieee"),
    ({"backends": "tf32"}, "tf32")])
def test_fp32_dots_follow_torch_matmul_precision_set_either_way(restore_matmul_precision, setting, want):
    """TF32 only where the user asked for it, through the legacy flag or torch >= 2.9's
    fp32_precision (after which reading allow_tf32 raises instead of answering)."""
    from gfm_fast.kernels._common import dot_settings

    matmul = torch.backends.cuda.matmul
    if "backends" in setting:  # the generic setting, inherited by matmul's "none"
        torch.backends.fp32_precision, matmul.fp32_precision = setting["backends"], "none"
    else:
        for name, value in setting.items():
            setattr(matmul, name, value)
    assert dot_settings(torch.float32) == (triton.language.float32, want)


# --------------------------------------------------------------------------- autotune pruning

def _stage_bytes_by_block(config):
    return config.kwargs["BLOCK"] * 1000


def test_configs_within_trims_stages_to_fit_shared_memory():
    from gfm_fast.kernels._common import configs_within

    configs = [triton.Config({"BLOCK": 64}, num_warps=4, num_stages=3),  # 192 kB: fits as it is
               triton.Config({"BLOCK": 128}, num_warps=8, num_stages=4),  # 512 kB: 1 stage fits
               triton.Config({"BLOCK": 128}, num_warps=8, num_stages=2),  # trimmed to a duplicate of the above
               triton.Config({"BLOCK": 512}, num_warps=8, num_stages=1)]  # one stage is too big: dropped
    kept = configs_within(configs, _stage_bytes_by_block, limit=200_000)
    assert [(c.kwargs["BLOCK"], c.num_warps, c.num_stages) for c in kept] == [(64, 4, 3), (128, 8, 1)]
    assert configs[1].num_stages == 4  # the autotuner's own list is not modified


def test_configs_within_keeps_the_smallest_config_when_nothing_fits():
    from gfm_fast.kernels._common import configs_within

    configs = [triton.Config({"BLOCK": 256}, num_stages=3), triton.Config({"BLOCK": 128}, num_stages=2)]
    kept = configs_within(configs, _stage_bytes_by_block, limit=1000)
    assert [(c.kwargs["BLOCK"], c.num_stages) for c in kept] == [(128, 1)]


def test_decoder_fp64_configs_fit_an_a100_and_an_h100():
    """Every decoder kernel keeps candidates in fp64 and bf16 on the cards' shared memory, and what
    it keeps fits (the sm_90 compile test below checks the estimate against ptxas's numbers)."""
    from gfm_fast.kernels._common import configs_within

    class Arg:
        def __init__(self, itemsize):
            self.itemsize = itemsize

        def element_size(self):
            return self.itemsize

    for limit in (166_912, 232_448):  # A100, H100 (bytes per program)
        for itemsize in (2, 8):
            args = dict(f_ptr=Arg(itemsize), w_ptr=Arg(itemsize), BLOCK_N=dec_kernels.GPU_FWD_BLOCK_N)
            for specs, stage_bytes in [(dec_kernels.FWD_GPU_SPECS, dec_kernels.fwd_stage_bytes),
                                       (dec_kernels.BWD_INPUT_GPU_SPECS, dec_kernels.bwd_input_stage_bytes),
                                       (dec_kernels.BWD_WEIGHT_GPU_SPECS, dec_kernels.bwd_weight_stage_bytes)]:
                size = lambda c: stage_bytes(c.kwargs, args)  # noqa: E731
                kept = configs_within(dec_kernels.gpu_configs(specs), size, limit)
                assert kept and all(c.num_stages * size(c) <= limit for c in kept), (limit, itemsize, specs)
                if itemsize == 2:
                    assert len(kept) == len(specs)  # bf16 (training) keeps every candidate


# --------------------------------------------------------------------------- GPU compilation

COMPILE_SCRIPT = textwrap.dedent(r'''
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gfm_fast.kernels import cosine_distillation as cd, decoder_l1_loss as dl, masked_patch_embed as pe

    from gfm_fast.kernels import _common

    H100_SHARED_MEMORY = 232448  # bytes a program may opt into on sm_90
    # Register spills (ptxas, bytes per thread) a launch config of the patch embedding may have. At
    # D = 1024 the forward's (BLOCK_M, D) fp32 row tile spills 2.1 KB unless the prune keeps
    # BLOCK_M = 16 at 8 warps (none).
    EMBED_FWD_SPILL_BUDGET = 512
    EMBED_BWD_SPILL_BUDGET = 512  # at D = 128 its candidates spill 0 B (BLOCK_M 16, 32) to about 200 B (64)
    _common.shared_memory_limit = lambda device_index: H100_SHARED_MEMORY  # no GPU to ask

    class FakeTensor:
        """What an autotune prune reads of a pointer argument: its element size and device."""
        class device:
            index = 0

        def __init__(self, type_name):
            self.itemsize = {"fp64": 8, "fp32": 4, "i32": 4, "fp16": 2, "bf16": 2, "i8": 1}[type_name.lstrip("*")]

        def element_size(self):
            return self.itemsize

    def launch_configs(kernel, values, constexprs):
        """Every config a launch could pick: the autotuner's prune (registers, shared memory) applied
        as on an H100."""
        configs = kernel.configs
        if kernel.early_config_prune:
            args = {name: FakeTensor(v) if isinstance(v, str) else v for name, v in values.items()}
            configs = kernel.early_config_prune(configs, args, **constexprs)
        assert configs, kernel.fn.__name__
        return configs

    def spill_stores(ptx):
        """Bytes of register spill stores per thread that ptxas reports for a kernel's PTX on sm_90a."""
        import re, subprocess, tempfile
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(90).path
        except TypeError:  # triton < 3.7 takes no arch
            ptxas = get_ptxas().path
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                                 text=True, check=True).stderr
        return max(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))

    def compile_for_h100(kernel, values, constexprs, spill_budget=None):
        """Compile like a real launch: pointers 16-byte aligned, ints divisible by 16 marked so; an
        autotuned kernel in each of its :func:`launch_configs`, each of which must fit shared memory
        (and, given a ``spill_budget``, spill at most that many bytes per thread)."""
        autotuned = isinstance(kernel, triton.runtime.Autotuner)
        for config in launch_configs(kernel, values, constexprs) if autotuned else [None]:
            fn = kernel.fn if autotuned else kernel
            all_constexprs = {**constexprs, **(config.kwargs if config else {})}
            signature, attrs = {}, {}
            for i, name in enumerate(fn.arg_names):
                value = values.get(name)
                if name in all_constexprs:
                    signature[name] = "constexpr"
                elif isinstance(value, str):
                    signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
                elif isinstance(value, float):
                    signature[name] = "fp32"
                else:
                    signature[name] = "i32"
                    if value % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {"num_warps": 4}
            compiled = triton.compile(ASTSource(fn, signature, constexprs=all_constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options=options)
            assert compiled.asm["cubin"], fn.__name__
            assert compiled.metadata.shared <= H100_SHARED_MEMORY, (fn.__name__, config, compiled.metadata.shared)
            if spill_budget is not None:
                spilled = spill_stores(compiled.asm["ptx"])
                assert spilled <= spill_budget, f"{fn.__name__} at D={values.get('D')}, {config}: {spilled} B spilled"

    for name in sys.argv[1:]:
        p = "*" + name
        acc, acc_p = (tl.float64, "*fp64") if name == "fp64" else (tl.float32, "*fp32")
        dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[name]
        gemm = dict(ACC_DTYPE=acc, DOT_DTYPE=dot, DOT_PRECISION="ieee")
        cos = dict(s_ptr=p, t_ptr=p, cos_ptr=acc_p, stats_ptr=acc_p, grad_loss_ptr=p, g_ptr=p, D=1024, batch=128)
        cos_const = dict(EPS=1e-8, BLOCK_D=1024, ACC_DTYPE=acc)
        compile_for_h100(cd._cosine_distillation_fwd_kernel, cos, dict(SAVE_STATS=True, **cos_const))
        compile_for_h100(cd._cosine_distillation_bwd_kernel, cos, cos_const)
        emb = dict(img_ptr=p, w_ptr=p, b_ptr=p, nw_ptr=p, nb_ptr=p, tok_ptr=p, out_ptr=p, gout_ptr=p,
                   mask_ptr="*fp32", mean_ptr=acc_p, rstd_ptr=acc_p, gw_part_ptr=acc_p, gvec_part_ptr=acc_p,
                   n_tokens=128 * 2304, tokens_per_image=2304, grid_w=48, mask_h=6, mask_w=6, cell_h=8, cell_w=8,
                   C=3, H=192, W=192, D=128, K=48)
        for dim in (128, 1024):  # GFM's embed width, and the widest the op tests sweep
            emb_const = dict(PATCH=4, BLOCK_D=pe._block_d(dim), BLOCK_K=pe._block_k(48, dim), **gemm)
            compile_for_h100(pe._masked_patch_embed_fwd_kernel, {**emb, "D": dim}, dict(EPS=1e-5, **emb_const),
                             spill_budget=EMBED_FWD_SPILL_BUDGET if dim == 1024 and name == "bf16" else None)
            compile_for_h100(pe._masked_patch_embed_bwd_kernel, {**emb, "D": dim}, emb_const,
                             spill_budget=EMBED_BWD_SPILL_BUDGET if dim == 128 and name == "bf16" else None)
        dec = dict(f_ptr=p, w_ptr=p, b_ptr=p, img_ptr=p, g_f_ptr=p, g_w_ptr=p, g_b_ptr=p, grad_loss_ptr=p,
                   loss_ptr=p, order_ptr="*i32", count_ptr="*i32", row_loss_ptr=acc_p, inv_norm_ptr=acc_p,
                   mask_ptr="*fp32", sign_ptr="*fp64" if name == "fp64" else "*i8", n_rows=128 * 36, D=1024,
                   O=3072, C=3, grid_h=6, grid_w=6, H=192, W=192, n_col_tiles=24, n_blocks=128 * 36,
                   pixels_per_block=1024, chans=3)
        compile_for_h100(dl._decoder_l1_loss_compact_kernel, dec, dict(EPS=1e-5, BLOCK=1024, ACC_DTYPE=acc))
        compile_for_h100(dl._decoder_l1_loss_finish_kernel, dec, dict(BLOCK=1024, ACC_DTYPE=acc))
        compile_for_h100(dl._decoder_l1_loss_fwd_kernel, dec, dict(STRIDE=32, BLOCK_N=128, STORE_SIGN=True, **gemm))
        compile_for_h100(dl._decoder_l1_loss_bwd_input_kernel, dec, gemm)
        compile_for_h100(dl._decoder_l1_loss_bwd_weight_kernel, dec, gemm)
    print("compiled")
''')


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend (ptxas) here")
def test_kernels_compile_for_h100_without_a_gpu():
    """Every kernel, in every autotune config its prune keeps on an H100, compiles to an sm_90 cubin
    for the GFM shapes and fits shared memory, in bf16 (the training dtype) and fp64 (whose tl.dot
    lowering has its own restrictions); the patch embedding's configs also stay within a register
    spill budget (ptxas). Runs in a subprocess because this process imported triton in interpreter
    mode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, "bf16", "fp64"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
