"""Triton kernels for GFM's decoder (1x1 conv + PixelShuffle) fused with the masked L1 loss.

The decoder's stride equals the mask block size, so decoder output position (b, y, x) is exactly
one mask block, and its O = stride*stride*C conv outputs are exactly that block's pixels
(channel o = c*s*s + i*s + j -> pixel (c, y*s + i, x*s + j), PixelShuffle order). The loss is
therefore a GEMM over the masked blocks only (docs/method.md, "Where the speed is"):

1. ``_decoder_l1_loss_compact_kernel``: lists the masked blocks first (``order``), counts them and
   computes 1 / ((count*s*s + eps) * C), all on the device: no host sync, no data-dependent shapes.
2. ``_decoder_l1_loss_fwd_kernel``: for BLOCK_M masked blocks x BLOCK_N pixels, recon = features @ W^T
   + bias on the tensor cores (fp32 accumulation), compared with the image pixels in the epilogue:
   per-row |image - recon| sums, and (when a gradient is needed) sign(recon - image) as int8, the
   only per-pixel value that backward needs (and it is exact in one byte). Tiles past the masked
   blocks skip the GEMM. No reconstruction, pixel mask or per-pixel loss is ever written. The sign
   buffer is allocated for all B*h*w blocks (the masked count lives on the device; asking the host
   would sync) but only the masked rows are written or read: 1 byte per pixel, vs 2-4 bytes for
   each of the reference chain's full-resolution tensors.
3. ``_decoder_l1_loss_finish_kernel``: adds the per-row sums in a fixed order (deterministic) and
   scales by the normaliser.
4. ``_decoder_l1_loss_bwd_input_kernel`` / ``_decoder_l1_loss_bwd_weight_kernel``: g_features =
   scale * sign @ W and g_weight = scale * sign^T @ features, g_bias = scale * colsum(sign), with
   scale = grad_loss / ((count*s*s + eps) * C) read on the device. Unmasked blocks get zero rows.

Gradients follow torch: d|x|/dx = sign(x), which is 0 at x == 0.
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from gfm_fast.kernels._common import (INTERPRET, MIN_DOT_DIM, acc_dtype, acc_torch_dtype, check_tensors,
                                      dot_settings, prune_to_shared_memory)

# Pixel columns per forward tile. Not autotuned: the per-row loss partials are laid out by column
# tile, and a fixed layout lets every autotune candidate overwrite exactly the same slots.
GPU_FWD_BLOCK_N = 128
FWD_BLOCK_N = 32 if INTERPRET else GPU_FWD_BLOCK_N
COMPACT_BLOCK = 1024  # mask entries per step of the single-program compaction
FINISH_BLOCK = 1024  # partial sums per step of the single-program final reduction


def gpu_configs(specs) -> List[triton.Config]:
    return [triton.Config(kwargs, num_warps=w, num_stages=s) for kwargs, w, s in specs]


def _configs(gpu_specs, interpret_config):
    """Autotune candidates; the interpreter gets one small config (no benchmarking, tiny tiles)."""
    if INTERPRET:
        return [triton.Config(interpret_config, num_warps=4)]
    return gpu_configs(gpu_specs)


# (tile sizes, num_warps, num_stages) candidates on a GPU; prune_to_shared_memory trims the stages
# (or drops the config) where the pipelined operand tiles would not fit, e.g. fp64 on any card.
FWD_GPU_SPECS = [
    ({"BLOCK_M": 128, "BLOCK_K": 64}, 8, 3), ({"BLOCK_M": 128, "BLOCK_K": 64}, 8, 4),
    ({"BLOCK_M": 128, "BLOCK_K": 32}, 8, 4), ({"BLOCK_M": 64, "BLOCK_K": 64}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_K": 32}, 4, 5), ({"BLOCK_M": 64, "BLOCK_K": 64}, 8, 3)]
BWD_INPUT_GPU_SPECS = [
    ({"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_O": 64}, 8, 3), ({"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_O": 32}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_O": 64}, 4, 4), ({"BLOCK_M": 128, "BLOCK_D": 64, "BLOCK_O": 64}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_O": 64}, 4, 5), ({"BLOCK_M": 128, "BLOCK_D": 256, "BLOCK_O": 64}, 8, 3)]
BWD_WEIGHT_GPU_SPECS = [
    ({"BLOCK_O": 128, "BLOCK_D": 128, "BLOCK_R": 64}, 8, 3), ({"BLOCK_O": 128, "BLOCK_D": 128, "BLOCK_R": 32}, 4, 4),
    ({"BLOCK_O": 64, "BLOCK_D": 128, "BLOCK_R": 64}, 4, 4), ({"BLOCK_O": 128, "BLOCK_D": 64, "BLOCK_R": 64}, 4, 4),
    ({"BLOCK_O": 64, "BLOCK_D": 64, "BLOCK_R": 64}, 4, 5), ({"BLOCK_O": 256, "BLOCK_D": 128, "BLOCK_R": 64}, 8, 3)]

_FWD_CONFIGS = _configs(FWD_GPU_SPECS, {"BLOCK_M": 16, "BLOCK_K": 16})
_BWD_INPUT_CONFIGS = _configs(BWD_INPUT_GPU_SPECS, {"BLOCK_M": 16, "BLOCK_D": 16, "BLOCK_O": 32})
_BWD_WEIGHT_CONFIGS = _configs(BWD_WEIGHT_GPU_SPECS, {"BLOCK_O": 32, "BLOCK_D": 16, "BLOCK_R": 16})


# Bytes of one pipeline stage: the tl.dot operand tiles one K step stages in shared memory, at the
# dot's operand width (the features' dtype; int8 signs are widened before they are staged).
def fwd_stage_bytes(tiles, args) -> int:
    return (tiles["BLOCK_M"] + args["BLOCK_N"]) * tiles["BLOCK_K"] * args["f_ptr"].element_size()


def bwd_input_stage_bytes(tiles, args) -> int:
    return tiles["BLOCK_O"] * (tiles["BLOCK_M"] + tiles["BLOCK_D"]) * args["w_ptr"].element_size()


def bwd_weight_stage_bytes(tiles, args) -> int:
    return tiles["BLOCK_R"] * (tiles["BLOCK_O"] + tiles["BLOCK_D"]) * args["f_ptr"].element_size()


class DecoderL1Residuals(NamedTuple):
    """What the backward needs besides features and weight (all tensors: save_for_backward-able)."""
    order: torch.Tensor  # (B*h*w,) int32 block indices, the `count` masked ones first
    count: torch.Tensor  # (1,) int32 number of masked blocks
    inv_norm: torch.Tensor  # (1,) 1 / ((count*s*s + eps) * C), fp32 (fp64 for fp64 inputs)
    sign: torch.Tensor  # (B*h*w, O) sign(recon - image), int8 (fp64 inputs: fp64); rows >= count never read


@triton.jit
def _tile(pid, BLOCK: tl.constexpr, n):
    """Indices of the pid-th BLOCK-wide tile along an axis of length n, and which of them are < n."""
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < n


@triton.jit
def _sign_tile(sign_ptr, rows, row_ok, outs, o_ok, O):
    """The (rows, outs) tile of the saved signs, 0 outside the masked rows and past O."""
    return tl.load(sign_ptr + rows.to(tl.int64)[:, None] * O + outs[None, :], mask=row_ok[:, None] & o_ok[None, :],
                   other=0)


@triton.jit
def _backward_scale(grad_loss_ptr, inv_norm_ptr, ACC_DTYPE: tl.constexpr):
    """grad_loss / ((count*s*s + eps) * C): what each saved sign is worth in the gradients."""
    return tl.load(grad_loss_ptr).to(ACC_DTYPE) * tl.load(inv_norm_ptr)


@triton.jit
def _decoder_l1_loss_compact_kernel(mask_ptr, order_ptr, count_ptr, inv_norm_ptr, n_blocks, pixels_per_block,
                                    chans, EPS: tl.constexpr, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Single program: order = masked block indices (ascending) then the others; count; 1/normaliser."""
    eps = tl.full((), EPS, ACC_DTYPE)  # exact in fp64 (a runtime float argument would be fp32 on the GPU)
    n_masked = tl.zeros((), tl.int32)
    n_kept = tl.zeros((), tl.int32)
    for start in range(0, n_blocks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < n_blocks
        masked = (tl.load(mask_ptr + idx, mask=valid, other=0.0) > 0.5) & valid
        kept = valid & (masked == 0)
        masked_i = masked.to(tl.int32)
        kept_i = kept.to(tl.int32)
        # Masked blocks fill order from the front, the others from the back.
        front = n_masked + tl.cumsum(masked_i, axis=0) - 1
        back = n_blocks - n_kept - tl.cumsum(kept_i, axis=0)
        tl.store(order_ptr + tl.where(masked, front, back), idx, mask=valid)
        n_masked += tl.sum(masked_i, axis=0)
        n_kept += tl.sum(kept_i, axis=0)
    tl.store(count_ptr, n_masked)
    norm = (n_masked.to(ACC_DTYPE) * pixels_per_block + eps) * chans
    tl.store(inv_norm_ptr, 1.0 / norm)


@triton.autotune(configs=_FWD_CONFIGS, key=["n_rows", "O", "D"],
                 prune_configs_by={"early_config_prune": prune_to_shared_memory(fwd_stage_bytes, "f_ptr")})
@triton.jit
def _decoder_l1_loss_fwd_kernel(
    f_ptr, w_ptr, b_ptr, img_ptr, order_ptr, count_ptr, row_loss_ptr, sign_ptr,
    n_rows, D, O, C, grid_h, grid_w, H, W, n_col_tiles,
    STRIDE: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STORE_SIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    count = tl.load(count_ptr)
    rows, row_ok = _tile(pid_m, BLOCK_M, count)  # positions in `order`: masked blocks first
    block = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # b*h*w + y*w + x
    outs, out_ok = _tile(pid_n, BLOCK_N, O)
    # Tiles past the masked blocks run the K loop zero times: only masked blocks cost FLOPs.
    k_end = tl.where(pid_m * BLOCK_M < count, D, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for k_start in range(0, k_end, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        f = tl.load(f_ptr + block[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # weight is (O, D) row-major; read its (BLOCK_K, BLOCK_N) transpose tile.
        w_t = tl.load(w_ptr + outs[None, :] * D + ks[:, None], mask=k_ok[:, None] & out_ok[None, :], other=0.0)
        acc = tl.dot(f.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    recon = acc + tl.load(b_ptr + outs, mask=out_ok, other=0.0).to(ACC_DTYPE)[None, :]
    # PixelShuffle addressing: block (b, y, x), channel o = c*s*s + i*s + j -> pixel (b, c, y*s + i, x*s + j).
    image = block // (grid_h * grid_w)
    y = (block // grid_w) % grid_h
    x = block % grid_w
    c = outs // (STRIDE * STRIDE)
    i = (outs // STRIDE) % STRIDE
    j = outs % STRIDE
    pixel = (image * C * H * W + y * STRIDE * W + x * STRIDE)[:, None] + (c * H * W + i * W + j)[None, :]
    tile_ok = row_ok[:, None] & out_ok[None, :]
    target = tl.load(img_ptr + pixel, mask=tile_ok, other=0.0).to(ACC_DTYPE)
    diff = tl.where(tile_ok, recon - target, 0.0)
    # Every row of every config is written (zeros past `count`), so autotune reruns are harmless.
    tl.store(row_loss_ptr + rows * n_col_tiles + pid_n, tl.sum(tl.abs(diff), axis=1), mask=rows < n_rows)
    if STORE_SIGN:
        sign = (diff > 0).to(tl.int8) - (diff < 0).to(tl.int8)
        tl.store(sign_ptr + rows.to(tl.int64)[:, None] * O + outs[None, :], sign.to(sign_ptr.dtype.element_ty),
                 mask=tile_ok)


@triton.jit
def _decoder_l1_loss_finish_kernel(row_loss_ptr, count_ptr, inv_norm_ptr, loss_ptr, n_col_tiles,
                                   BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Single program: loss = sum of the masked rows' partial sums * inv_norm, in a fixed order."""
    n = tl.load(count_ptr) * n_col_tiles  # rows past `count` hold zeros: skip them
    total = tl.zeros((BLOCK,), ACC_DTYPE)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        total += tl.load(row_loss_ptr + idx, mask=idx < n, other=0.0)
    loss = tl.sum(total, axis=0) * tl.load(inv_norm_ptr)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.autotune(configs=_BWD_INPUT_CONFIGS, key=["n_rows", "O", "D"],
                 prune_configs_by={"early_config_prune": prune_to_shared_memory(bwd_input_stage_bytes, "w_ptr")})
@triton.jit
def _decoder_l1_loss_bwd_input_kernel(
    sign_ptr, w_ptr, order_ptr, count_ptr, grad_loss_ptr, inv_norm_ptr, g_f_ptr,
    n_rows, D, O,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """g_features[order[r]] = scale * sign[r] @ W for masked r; zero rows for the unmasked blocks."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    count = tl.load(count_ptr)
    rows, row_ok = _tile(pid_m, BLOCK_M, count)
    row_exists = rows < n_rows
    block = tl.load(order_ptr + rows, mask=row_exists, other=0).to(tl.int64)
    ds, d_ok = _tile(pid_d, BLOCK_D, D)
    o_end = tl.where(pid_m * BLOCK_M < count, O, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC_DTYPE)
    for o_start in range(0, o_end, BLOCK_O):
        outs = o_start + tl.arange(0, BLOCK_O)
        o_ok = outs < O
        sign = _sign_tile(sign_ptr, rows, row_ok, outs, o_ok, O)
        w = tl.load(w_ptr + outs[:, None] * D + ds[None, :], mask=o_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(sign.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    scale = _backward_scale(grad_loss_ptr, inv_norm_ptr, ACC_DTYPE)
    tl.store(g_f_ptr + block[:, None] * D + ds[None, :], (acc * scale).to(g_f_ptr.dtype.element_ty),
             mask=row_exists[:, None] & d_ok[None, :])


@triton.autotune(configs=_BWD_WEIGHT_CONFIGS, key=["n_rows", "O", "D"],
                 prune_configs_by={"early_config_prune": prune_to_shared_memory(bwd_weight_stage_bytes, "f_ptr")})
@triton.jit
def _decoder_l1_loss_bwd_weight_kernel(
    sign_ptr, f_ptr, order_ptr, count_ptr, grad_loss_ptr, inv_norm_ptr, g_w_ptr, g_b_ptr,
    n_rows, D, O,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """g_weight = scale * sign^T @ features[order] over the masked rows; g_bias = scale * colsum(sign)."""
    pid_o = tl.program_id(0)
    pid_d = tl.program_id(1)
    count = tl.load(count_ptr)
    outs, o_ok = _tile(pid_o, BLOCK_O, O)
    ds, d_ok = _tile(pid_d, BLOCK_D, D)
    acc = tl.zeros((BLOCK_O, BLOCK_D), ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_O,), ACC_DTYPE)
    for r_start in range(0, count, BLOCK_R):
        rows = r_start + tl.arange(0, BLOCK_R)
        row_ok = rows < count
        block = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        sign = _sign_tile(sign_ptr, rows, row_ok, outs, o_ok, O)
        f = tl.load(f_ptr + block[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(sign.to(DOT_DTYPE)), f.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
        bias_acc += tl.sum(sign.to(ACC_DTYPE), axis=0)
    scale = _backward_scale(grad_loss_ptr, inv_norm_ptr, ACC_DTYPE)
    tl.store(g_w_ptr + outs.to(tl.int64)[:, None] * D + ds[None, :], (acc * scale).to(g_w_ptr.dtype.element_ty),
             mask=o_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(g_b_ptr + outs, (bias_acc * scale).to(g_b_ptr.dtype.element_ty), mask=o_ok)


def _sign_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of sign(recon - image): one byte, except for fp64, where Triton cannot feed an 8-bit
    tensor to an fp64 tl.dot (its MMA lowering asserts on sm_90), so the signs are stored as fp64."""
    return torch.float64 if dtype == torch.float64 else torch.int8


def _check_inputs(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor,
                  mask: torch.Tensor, stride: int) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be NHWC (B, h, w, D), got {tuple(features.shape)}")
    batch, grid_h, grid_w, dim = features.shape
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if images.dim() != 4 or images.shape[0] != batch or images.shape[2:] != (grid_h * stride, grid_w * stride):
        raise ValueError(f"images must have shape ({batch}, C, {grid_h * stride}, {grid_w * stride}) for features "
                         f"{tuple(features.shape)} at stride {stride}, got {tuple(images.shape)}")
    out_chans = stride * stride * images.shape[1]
    if weight.shape != (out_chans, dim):
        raise ValueError(f"weight must have shape ({out_chans}, {dim}) (stride*stride*C, D), got "
                         f"{tuple(weight.shape)}")
    if bias.shape != (out_chans,):
        raise ValueError(f"bias must have shape ({out_chans},), got {tuple(bias.shape)}")
    if mask.shape != (batch, grid_h, grid_w):
        raise ValueError(f"mask must have shape ({batch}, {grid_h}, {grid_w}) (one entry per decoder output "
                         f"block), got {tuple(mask.shape)}")
    if mask.dtype != torch.float32:
        raise ValueError(f"mask of shape {tuple(mask.shape)} must be float32 0/1, got {mask.dtype}; use mask.float()")
    check_tensors("features", features, weight=weight, bias=bias, images=images, mask=mask)


def decoder_l1_loss_forward(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor,
                            mask: torch.Tensor, stride: int = 32, needs_grad: bool = True,
                            eps: float = 1e-5) -> Tuple[torch.Tensor, DecoderL1Residuals]:
    """Masked L1 loss of the decoder's reconstruction, over masked blocks only.

    Args:
        features: r, NHWC (B, h, w, D), contiguous, fp16/bf16/fp32/fp64.
        weight: decoder 1x1 conv weight (O, D), O = stride*stride*C.
        bias: (O,).
        images: target NCHW (B, C, h*stride, w*stride).
        mask: float32 0/1 (B, h, w) at block level (one entry per decoder output position).
        stride: decoder stride = PixelShuffle factor = mask block size in pixels.
        needs_grad: also record sign(recon - image) for the backward.
        eps: added to the masked pixel count (GFM's 1e-5).

    Returns:
        (loss, residuals): loss = sum_masked |images - recon| / (count*s*s + eps) / C as a 0-dim tensor
        in the features' dtype; residuals for :func:`decoder_l1_loss_backward` (``sign`` is empty when
        ``needs_grad`` is False).
    """
    _check_inputs(features, weight, bias, images, mask, stride)
    batch, grid_h, grid_w, dim = features.shape
    chans, height, width = images.shape[1:]
    out_chans = weight.shape[0]
    n_rows = batch * grid_h * grid_w
    device = features.device
    acc_torch = acc_torch_dtype(features.dtype)
    order = torch.empty(n_rows, dtype=torch.int32, device=device)
    count = torch.empty(1, dtype=torch.int32, device=device)
    inv_norm = torch.empty(1, dtype=acc_torch, device=device)
    _decoder_l1_loss_compact_kernel[(1,)](mask, order, count, inv_norm, n_rows, stride * stride, chans, EPS=eps,
                                          BLOCK=COMPACT_BLOCK, ACC_DTYPE=acc_dtype(features.dtype))
    block_n = min(FWD_BLOCK_N, max(MIN_DOT_DIM, triton.next_power_of_2(out_chans)))
    n_col_tiles = triton.cdiv(out_chans, block_n)
    row_loss = torch.empty((n_rows, n_col_tiles), dtype=acc_torch, device=device)
    sign_shape = (n_rows, out_chans) if needs_grad else (0, out_chans)
    sign = torch.empty(sign_shape, dtype=_sign_dtype(features.dtype), device=device)
    dot_dtype, precision = dot_settings(features.dtype)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), n_col_tiles)  # noqa: E731
    _decoder_l1_loss_fwd_kernel[grid](
        features, weight, bias, images, order, count, row_loss, sign if needs_grad else row_loss,
        n_rows, dim, out_chans, chans, grid_h, grid_w, height, width, n_col_tiles,
        STRIDE=stride, BLOCK_N=block_n, ACC_DTYPE=acc_dtype(features.dtype), DOT_DTYPE=dot_dtype,
        DOT_PRECISION=precision, STORE_SIGN=needs_grad)
    loss = torch.empty((), dtype=features.dtype, device=device)
    _decoder_l1_loss_finish_kernel[(1,)](row_loss, count, inv_norm, loss, n_col_tiles, BLOCK=FINISH_BLOCK,
                                         ACC_DTYPE=acc_dtype(features.dtype))
    return loss, DecoderL1Residuals(order, count, inv_norm, sign)


def decoder_l1_loss_backward(grad_loss: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                             residuals: DecoderL1Residuals) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`decoder_l1_loss_forward` for features, weight and bias.

    Args:
        grad_loss: single-element upstream gradient on the features' device.
        features: the forward's NHWC (B, h, w, D) features.
        weight: the forward's (O, D) weight.
        residuals: the forward's residuals, recorded with ``needs_grad=True``.

    Returns:
        (g_features NHWC (B, h, w, D), g_weight (O, D), g_bias (O,)), in the features' dtype.
    """
    order, count, inv_norm, sign = residuals
    if features.dim() != 4 or not features.is_contiguous():
        raise ValueError(f"features must be contiguous NHWC (B, h, w, D), got {tuple(features.shape)}")
    batch, grid_h, grid_w, dim = features.shape
    n_rows = batch * grid_h * grid_w
    out_chans = weight.shape[0]
    if weight.shape != (out_chans, dim) or not weight.is_contiguous() or weight.dtype != features.dtype:
        raise ValueError(f"weight must be a contiguous ({out_chans}, {dim}) {features.dtype} tensor, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if sign.shape != (n_rows, out_chans) or order.shape != (n_rows,):
        raise ValueError(f"residuals.sign must have shape ({n_rows}, {out_chans}) and residuals.order ({n_rows},), "
                         f"got {tuple(sign.shape)} and {tuple(order.shape)}; run the forward with needs_grad=True")
    if grad_loss.numel() != 1 or grad_loss.device != features.device:
        raise ValueError(f"grad_loss must be a single element on {features.device}, got shape "
                         f"{tuple(grad_loss.shape)} on {grad_loss.device}")
    grad_loss = grad_loss.reshape(1)
    g_features = torch.empty_like(features)
    g_weight = torch.empty_like(weight)
    g_bias = torch.empty(out_chans, dtype=features.dtype, device=features.device)
    dot_dtype, precision = dot_settings(features.dtype)
    common = dict(ACC_DTYPE=acc_dtype(features.dtype), DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
    grid_in = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(dim, meta["BLOCK_D"]))  # noqa: E731
    _decoder_l1_loss_bwd_input_kernel[grid_in](sign, weight, order, count, grad_loss, inv_norm, g_features,
                                               n_rows, dim, out_chans, **common)
    grid_wt = lambda meta: (triton.cdiv(out_chans, meta["BLOCK_O"]), triton.cdiv(dim, meta["BLOCK_D"]))  # noqa: E731
    _decoder_l1_loss_bwd_weight_kernel[grid_wt](sign, features, order, count, grad_loss, inv_norm, g_weight, g_bias,
                                               n_rows, dim, out_chans, **common)
    return g_features, g_weight, g_bias
