"""Triton kernels for the masked patch embedding: patchify conv + LayerNorm + mask-token blend.

Forward, one pass over the tokens: each program takes BLOCK_M tokens, gathers their p x p x C
patches straight from the NCHW image (no im2col buffer), multiplies them with the flattened conv
weight on the tensor cores (tl.dot, fp32 accumulation), adds the bias, normalises the row
(LayerNorm over D, kept whole in registers) and blends in the mask token. The mask is read at
whatever grid it comes in (token level or 32-px blocks) and upsampled by index arithmetic. Masked
tokens read no image bytes: their output is the mask token.

Backward: masked tokens only feed g_mask_token (docs/method.md, "Masked patch embedding"), so for
the others the kernel recomputes x = conv(patch) from the image (K = C*p*p = 48 values per token,
cheaper to re-read than a saved (B, L, D) activation), rebuilds x_hat from the saved per-token mean
and rstd, and accumulates g_weight = dx^T @ patches, g_bias, g_norm_weight, g_norm_bias and
g_mask_token. A fixed number of persistent programs each own a slice of the token blocks and write
one partial sum per parameter; the launcher adds the partials (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from gfm_fast.kernels._common import (INTERPRET, MIN_DOT_DIM, acc_dtype, acc_torch_dtype, check_tensors,
                                      dot_settings, prune_to_shared_memory)

MAX_BLOCK_K = 64  # patch elements per tl.dot step; K = 48 for RGB at p = 4 fits in one step
NUM_VECTOR_GRADS = 4  # per-program partials: g_bias, g_norm_weight, g_norm_bias, g_mask_token
INTERPRET_PROGRAMS = 2  # persistent backward programs under the interpreter (keeps the row loop exercised)
MAX_WEIGHT_TILE = 8192  # fp32 elements of the backward's g_weight accumulator: 32 registers/thread at 8 warps


def gpu_fwd_configs():
    # BLOCK_M = 16 at 8 warps is the one whose fp32 (16, D) row tile stays in registers at D = 1024
    # (ptxas, sm_90, bf16: no spills, against 2.1 KB/thread for BLOCK_M = 32 at 4 warps).
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm in (32, 64, 128) for w in (4, 8) for s in (2, 3)] + \
           [triton.Config({"BLOCK_M": 16}, num_warps=8, num_stages=s) for s in (2, 3)]


def gpu_bwd_configs():
    # 8 warps: the (D, BLOCK_K) g_weight accumulator plus four (D,) ones spill with 4. At 8 warps,
    # ptxas (sm_90, bf16, D = 128, GFM's shapes specialised as at launch) spills nothing at
    # BLOCK_M = 16 or 32 and about 200 B/thread at 64.
    return [triton.Config({"BLOCK_M": bm}, num_warps=8, num_stages=s) for bm in (16, 32, 64) for s in (2, 3)]


def _configs(gpu_configs):
    if INTERPRET:  # one config: autotuning in the interpreter would only cost time
        return [triton.Config({"BLOCK_M": 16}, num_warps=4)]
    return gpu_configs()


def fwd_stage_bytes(tiles, args) -> int:
    """One K step's tl.dot operands: a (BLOCK_M, BLOCK_K) patch tile and a (BLOCK_K, BLOCK_D) weight tile."""
    return (tiles["BLOCK_M"] + args["BLOCK_D"]) * args["BLOCK_K"] * args["img_ptr"].element_size()


def bwd_stage_bytes(tiles, args) -> int:
    """The forward's operands plus the patch tile of the g_weight product."""
    return (2 * tiles["BLOCK_M"] + args["BLOCK_D"]) * args["BLOCK_K"] * args["img_ptr"].element_size()


def _prune(max_tile: int, stage_bytes):
    """Drop configs whose (BLOCK_M, BLOCK_D) fp32 tiles would spill registers (if none fits, keep the
    smallest BLOCK_M with the most warps: the most registers per tile), then fit the rest to shared
    memory (wide fp64 rows need fewer stages)."""
    fit_shared_memory = prune_to_shared_memory(stage_bytes, "img_ptr")

    def prune(configs, named_args, **kwargs):
        block_d = kwargs["BLOCK_D"]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_d <= max_tile]
        kept = kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], -c.num_warps))]
        return fit_shared_memory(kept, named_args, **kwargs)

    return prune


@triton.jit
def _token_coords(rows, tokens_per_image, grid_w, mask_h, mask_w, cell_h, cell_w, C, H, W,
                  PATCH: tl.constexpr):
    """Per token row: image offset of its patch's top-left pixel, and its mask index (block level)."""
    image = rows // tokens_per_image
    within = rows % tokens_per_image
    ty = within // grid_w
    tx = within % grid_w
    patch_offset = image * C * H * W + (ty * PATCH) * W + tx * PATCH
    # Nearest upsampling of the (mask_h, mask_w) grid to the token grid, by index arithmetic.
    mask_index = image * mask_h * mask_w + (ty // cell_h) * mask_w + tx // cell_w
    return patch_offset, mask_index


@triton.jit
def _patch_tile(img_ptr, patch_offset, load_rows, k_start, K, H, W, PATCH: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) slice of the flattened patches, columns in the conv weight's (c, ky, kx) order."""
    ks = k_start + tl.arange(0, BLOCK_K)
    c = ks // (PATCH * PATCH)
    ky = (ks // PATCH) % PATCH
    kx = ks % PATCH
    k_offset = c * H * W + ky * W + kx
    return tl.load(img_ptr + patch_offset[:, None] + k_offset[None, :],
                   mask=load_rows[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _conv_rows(img_ptr, w_ptr, b_ptr, patch_offset, load_rows, cols, D, K, H, W,
               PATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
               ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x = patches @ weight^T + bias for BLOCK_M tokens: (BLOCK_M, BLOCK_D) in ACC_DTYPE."""
    col_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        patches = _patch_tile(img_ptr, patch_offset, load_rows, k_start, K, H, W, PATCH, BLOCK_K)
        ks = k_start + tl.arange(0, BLOCK_K)
        # weight is (D, K) row-major; read its (BLOCK_K, BLOCK_D) transpose tile.
        w_t = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=(ks < K)[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(patches.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    return acc + bias[None, :]


@triton.autotune(configs=_configs(gpu_fwd_configs), key=["D", "K"],
                 prune_configs_by={"early_config_prune": _prune(16384, fwd_stage_bytes)})
@triton.jit
def _masked_patch_embed_fwd_kernel(
    img_ptr, w_ptr, b_ptr, nw_ptr, nb_ptr, mask_ptr, tok_ptr, out_ptr, mean_ptr, rstd_ptr,
    n_tokens, tokens_per_image, grid_w, mask_h, mask_w, cell_h, cell_w, C, H, W, D, K,
    EPS: tl.constexpr, PATCH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    eps = tl.full((), EPS, ACC_DTYPE)  # exact in fp64 (a runtime float argument would be fp32 on the GPU)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    patch_offset, mask_index = _token_coords(rows, tokens_per_image, grid_w, mask_h, mask_w, cell_h,
                                             cell_w, C, H, W, PATCH)
    masked = tl.load(mask_ptr + mask_index, mask=row_ok, other=0.0) > 0.5
    keep = row_ok & (masked == 0)
    # Masked tokens skip the image read; their x is just the bias and is overwritten below.
    x = _conv_rows(img_ptr, w_ptr, b_ptr, patch_offset, keep, cols, D, K, H, W, PATCH, BLOCK_M, BLOCK_D, BLOCK_K,
                   ACC_DTYPE, DOT_DTYPE, DOT_PRECISION)
    mean = tl.sum(x, axis=1) / D  # padded columns are exactly 0
    centred = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    norm_w = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    norm_b = tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    y = centred * rstd[:, None] * norm_w[None, :] + norm_b[None, :]
    token = tl.load(tok_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    out = tl.where(masked[:, None], token[None, :], y)  # x * (1 - m) + mask_token * m for m in {0, 1}
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.autotune(configs=_configs(gpu_bwd_configs), key=["D", "K"],
                 prune_configs_by={"early_config_prune": _prune(8192, bwd_stage_bytes)})
@triton.jit
def _masked_patch_embed_bwd_kernel(
    img_ptr, w_ptr, b_ptr, nw_ptr, mask_ptr, mean_ptr, rstd_ptr, gout_ptr, gw_part_ptr, gvec_part_ptr,
    n_tokens, tokens_per_image, grid_w, mask_h, mask_w, cell_h, cell_w, C, H, W, D, K,
    PATCH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    pid_k = tl.program_id(1)  # which BLOCK_K slice of g_weight this program owns
    k_start = pid_k * BLOCK_K
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    norm_w = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    g_w = tl.zeros((BLOCK_D, BLOCK_K), ACC_DTYPE)
    g_b = tl.zeros((BLOCK_D,), ACC_DTYPE)
    g_nw = tl.zeros((BLOCK_D,), ACC_DTYPE)
    g_nb = tl.zeros((BLOCK_D,), ACC_DTYPE)
    g_tok = tl.zeros((BLOCK_D,), ACC_DTYPE)
    for block in range(pid, tl.cdiv(n_tokens, BLOCK_M), n_programs):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < n_tokens
        patch_offset, mask_index = _token_coords(rows, tokens_per_image, grid_w, mask_h, mask_w, cell_h,
                                                 cell_w, C, H, W, PATCH)
        masked = tl.load(mask_ptr + mask_index, mask=row_ok, other=0.0) > 0.5
        keep = row_ok & (masked == 0)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        g_out = tl.load(gout_ptr + rows[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(ACC_DTYPE)
        g_tok += tl.sum(tl.where(masked[:, None], g_out, 0.0), axis=0)
        dy = tl.where(keep[:, None], g_out, 0.0)  # masked rows send nothing into the norm or the conv
        x = _conv_rows(img_ptr, w_ptr, b_ptr, patch_offset, keep, cols, D, K, H, W, PATCH, BLOCK_M, BLOCK_D,
                       BLOCK_K, ACC_DTYPE, DOT_DTYPE, DOT_PRECISION)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(col_ok[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        g_nb += tl.sum(dy, axis=0)
        g_nw += tl.sum(dy * x_hat, axis=0)
        # LayerNorm backward: dx = rstd * (w*dy - mean(w*dy) - x_hat * mean(w*dy * x_hat)).
        wdy = dy * norm_w[None, :]
        c_hat = tl.sum(wdy * x_hat, axis=1) / D
        c_one = tl.sum(wdy, axis=1) / D
        dx = tl.where(tile_ok & keep[:, None], (wdy - x_hat * c_hat[:, None] - c_one[:, None]) * rstd[:, None], 0.0)
        g_b += tl.sum(dx, axis=0)
        patches = _patch_tile(img_ptr, patch_offset, keep, k_start, K, H, W, PATCH, BLOCK_K)
        g_w = tl.dot(tl.trans(dx.to(DOT_DTYPE)), patches.to(DOT_DTYPE), g_w, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
    ks = k_start + tl.arange(0, BLOCK_K)
    # Partials: g_weight (P, D, K); the vectors (P, 4, D). Every program writes its whole slice.
    # P * D * K can pass 2^31 for wide embeddings of many-band patches (one partial per SM): int64.
    tl.store(gw_part_ptr + pid.to(tl.int64) * D * K + cols[:, None] * K + ks[None, :], g_w,
             mask=col_ok[:, None] & (ks < K)[None, :])
    if pid_k == 0:
        vec_base = gvec_part_ptr + pid * 4 * D
        tl.store(vec_base + 0 * D + cols, g_b, mask=col_ok)
        tl.store(vec_base + 1 * D + cols, g_nw, mask=col_ok)
        tl.store(vec_base + 2 * D + cols, g_nb, mask=col_ok)
        tl.store(vec_base + 3 * D + cols, g_tok, mask=col_ok)


def _block_d(dim: int) -> int:
    return max(MIN_DOT_DIM, triton.next_power_of_2(dim))


def _block_k(k: int, dim: int) -> int:
    """Patch elements per step; wide embeddings take narrower slices so that the backward's
    (BLOCK_D, BLOCK_K) g_weight accumulator stays in registers (more slices, each recomputing x)."""
    return max(MIN_DOT_DIM, min(MAX_BLOCK_K, triton.next_power_of_2(k), MAX_WEIGHT_TILE // _block_d(dim)))


def _num_programs(device: torch.device, n_tokens: int) -> int:
    """Persistent programs of the backward: one per SM on a GPU, a few in the interpreter."""
    if device.type == "cuda":
        programs = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = INTERPRET_PROGRAMS
    return max(1, min(programs, triton.cdiv(n_tokens, MIN_DOT_DIM)))


def _geometry(images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> dict:
    """Integer arguments shared by both kernels (token grid, mask cells)."""
    batch, chans, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    mask_h, mask_w = mask.shape[1:]
    return dict(n_tokens=batch * grid_h * grid_w, tokens_per_image=grid_h * grid_w, grid_w=grid_w,
                mask_h=mask_h, mask_w=mask_w, cell_h=grid_h // mask_h, cell_w=grid_w // mask_w,
                C=chans, H=height, W=width)


def _check_inputs(images: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, patch_size: int,
                  **vectors: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    batch, chans, height, width = images.shape
    if patch_size <= 0 or height % patch_size or width % patch_size:
        raise ValueError(f"images of shape {tuple(images.shape)} are not divisible by patch_size {patch_size}")
    k = chans * patch_size * patch_size
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must have shape (D, {k}) (the conv weight flattened in (c, ky, kx) order), "
                         f"got {tuple(weight.shape)}")
    dim = weight.shape[0]
    for name, vector in vectors.items():
        if vector.shape != (dim,):
            raise ValueError(f"{name} must have shape ({dim},), got {tuple(vector.shape)}")
    grid_h, grid_w = height // patch_size, width // patch_size
    if (mask.dim() != 3 or mask.shape[0] != batch or mask.shape[1] == 0 or mask.shape[2] == 0
            or grid_h % mask.shape[1] or grid_w % mask.shape[2]):
        raise ValueError(f"mask must have shape (B={batch}, h, w) with h dividing {grid_h} and w dividing {grid_w} "
                         f"(token grid or a coarser block grid), got {tuple(mask.shape)}")
    if mask.dtype != torch.float32:
        raise ValueError(f"mask of shape {tuple(mask.shape)} must be float32 0/1, got {mask.dtype}; "
                         f"use mask.float()")
    check_tensors("images", images, weight=weight, mask=mask, **vectors)


def masked_patch_embed_forward(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               norm_weight: torch.Tensor, norm_bias: torch.Tensor, mask: torch.Tensor,
                               mask_token: torch.Tensor, patch_size: int = 4,
                               eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``LayerNorm(conv_p(images)) * (1 - m) + mask_token * m``.

    Args:
        images: NCHW (B, C, H, W), contiguous, fp16/bf16/fp32/fp64; H, W divisible by ``patch_size``.
        weight: conv weight flattened to (D, C*p*p) in (c, ky, kx) order.
        bias, norm_weight, norm_bias, mask_token: (D,).
        mask: float32 0/1 (B, h, w) on the token grid (H/p, W/p) or a coarser grid dividing it.
        patch_size: p (conv kernel = stride).
        eps: LayerNorm eps.

    Returns:
        (out, mean, rstd): tokens (B, L, D) in the images' dtype, L = (H/p)*(W/p) row-major over the
        token grid; and the per-token LayerNorm statistics (B*L,) (fp32, fp64 for fp64 inputs) for backward.
    """
    _check_inputs(images, weight, mask, patch_size, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias,
                  mask_token=mask_token)
    geometry = _geometry(images, mask, patch_size)
    dim, k = weight.shape
    n_tokens = geometry["n_tokens"]
    stats_dtype = acc_torch_dtype(images.dtype)
    out = torch.empty((images.shape[0], geometry["tokens_per_image"], dim), dtype=images.dtype, device=images.device)
    mean = torch.empty(n_tokens, dtype=stats_dtype, device=images.device)
    rstd = torch.empty(n_tokens, dtype=stats_dtype, device=images.device)
    dot_dtype, precision = dot_settings(images.dtype)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]),)  # noqa: E731
    _masked_patch_embed_fwd_kernel[grid](
        images, weight, bias, norm_weight, norm_bias, mask, mask_token, out, mean, rstd, **geometry, D=dim, K=k,
        EPS=eps, PATCH=patch_size, BLOCK_D=_block_d(dim), BLOCK_K=_block_k(k, dim), ACC_DTYPE=acc_dtype(images.dtype),
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
    return out, mean, rstd


def masked_patch_embed_backward(grad_out: torch.Tensor, images: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor, norm_weight: torch.Tensor, mask: torch.Tensor,
                                mean: torch.Tensor, rstd: torch.Tensor, patch_size: int = 4,
                                ) -> Tuple[torch.Tensor, ...]:
    """Parameter gradients of :func:`masked_patch_embed_forward` (no gradient for the images).

    Args:
        grad_out: (B, L, D), contiguous, in the images' dtype.
        images, weight, bias, norm_weight, mask, patch_size: the forward's inputs.
        mean, rstd: the per-token statistics returned by the forward.

    Returns:
        (g_weight (D, C*p*p), g_bias (D,), g_norm_weight (D,), g_norm_bias (D,), g_mask_token (D,)),
        in the images' dtype.
    """
    _check_inputs(images, weight, mask, patch_size, bias=bias, norm_weight=norm_weight)
    geometry = _geometry(images, mask, patch_size)
    dim, k = weight.shape
    n_tokens = geometry["n_tokens"]
    expected = (images.shape[0], geometry["tokens_per_image"], dim)
    if grad_out.shape != expected or grad_out.dtype != images.dtype or not grad_out.is_contiguous():
        raise ValueError(f"grad_out must be a contiguous {images.dtype} tensor of shape {expected}, got "
                         f"{tuple(grad_out.shape)} {grad_out.dtype}")
    stats_dtype = acc_torch_dtype(images.dtype)
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if stat.shape != (n_tokens,) or stat.dtype != stats_dtype:
            raise ValueError(f"{name} must be the ({n_tokens},) {stats_dtype} tensor returned by the forward, got "
                             f"{tuple(stat.shape)} {stat.dtype}")
    programs = _num_programs(images.device, n_tokens)
    block_k = _block_k(k, dim)
    g_weight_part = torch.empty((programs, dim, k), dtype=stats_dtype, device=images.device)
    g_vector_part = torch.empty((programs, NUM_VECTOR_GRADS, dim), dtype=stats_dtype, device=images.device)
    dot_dtype, precision = dot_settings(images.dtype)
    _masked_patch_embed_bwd_kernel[(programs, triton.cdiv(k, block_k))](
        images, weight, bias, norm_weight, mask, mean, rstd, grad_out, g_weight_part, g_vector_part, **geometry,
        D=dim, K=k, PATCH=patch_size, BLOCK_D=_block_d(dim), BLOCK_K=block_k, ACC_DTYPE=acc_dtype(images.dtype),
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
    g_weight = g_weight_part.sum(dim=0).to(images.dtype)
    g_bias, g_norm_weight, g_norm_bias, g_mask_token = g_vector_part.sum(dim=0).to(images.dtype).unbind(0)
    return g_weight, g_bias, g_norm_weight, g_norm_bias, g_mask_token
