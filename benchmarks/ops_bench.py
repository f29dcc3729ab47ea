"""Fused-op benchmarks at GFM's Swin-B shapes: every backend vs the plain-PyTorch reference.

    python benchmarks/ops_bench.py                                   # CPU, fp32, batch 16
    python benchmarks/ops_bench.py --dtype bfloat16 --out benchmarks/results/cpu_ops_bf16_b16.json
    python benchmarks/ops_bench.py --device cuda --batch 128

Cases (shapes of GFM's Swin-B student at 192 px, masks of 32-px blocks with 22 of 36 masked):
- masked_patch_embed: images (B, 3, 192, 192) -> tokens (B, 2304, 128), mask (B, 6, 6).
- decoder_l1_loss: r NHWC (B, 6, 6, 1024) viewed as NCHW, decoder 1024 -> 32*32*3, images, mask.
- cosine_distillation: z_s, z_t (B, 1024).
Backends: ``reference`` (gfm_fast.ops.reference, the baseline of every
speedup), the plain-PyTorch rearrangements a careful user would write without custom kernels
(``torch_masked_blocks``: the decoder and L1 on the masked blocks only; ``torch_gemm_where``: the
patch embedding as one GEMM, LayerNorm and torch.where), the decoder's ``gemm_floor`` (its three
GEMMs over the masked blocks alone: the time no exact implementation can beat), and the fused
``cpp`` / ``triton`` ops wherever they run on the device. Modes: forward (grad mode on, as in training), backward (the
forward runs untimed before each call), full (forward + backward). Runs of all backends are
interleaved (one sample per backend per round) so that load on a shared machine hits them alike.

Each record: op (case), backend, mode, shape, dtype, median/p20/p80 ms, images/s, peak bytes
allocated by torch during the timed call (CPU: allocator records; CUDA: allocator peak),
grad_bytes (the parameter/input gradients the call must produce, part of peak_bytes), speedup vs
reference, and the environment (device, versions, threads, git sha). For the bandwidth-bound ops
(masked_patch_embed, cosine_distillation) also min_bytes, the bytes any implementation must move
(see ``_min_bytes``), achieved_GBps = min_bytes / time and, on CUDA, bandwidth_fraction: that
over the card's device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _args import at_least, device as device_arg  # noqa: E402
from _timing import _quantile, copy_bandwidth, environment, peak_memory_bytes, time_fn  # noqa: E402
from _timing import print_table as print_records  # noqa: E402

OPS = ("masked_patch_embed", "decoder_l1_loss", "cosine_distillation")
MODES = ("forward", "backward", "full")
IMG, PATCH, EMBED, BLOCK, RATIO = 192, 4, 128, 32, 0.6  # GFM at 192 px: 4-px patches, 32-px mask blocks
STAGE4_DIM, FEAT_DIM, CHANS = 1024, 1024, 3  # r (B, 6, 6, 1024); z_s, z_t (B, 1024)
BASELINES = {"masked_patch_embed": ["torch_gemm_where"], "decoder_l1_loss": ["torch_masked_blocks", "gemm_floor"]}
# torch.compile of the reference chain: the GPU target's second yardstick (default on CUDA only:
# inductor's CPU compile of it takes minutes on a small machine; --backends selects it anywhere).
GPU_BASELINES = {"decoder_l1_loss": ["reference_compiled"]}
NOTES = {
    "decoder_l1_loss/cpp": "computes the gradients in the forward (fused-linear-loss idiom) and only scales them in "
                           "the backward: compare the 'full' mode",
    "decoder_l1_loss/gemm_floor": "not a loss: only the three GEMMs over the n masked blocks (n x D x O each) that "
                                  "any exact implementation must run, the floor of the fused op's time",
}


# ---------------------------------------------------------------- plain-PyTorch rearrangements


def torch_gemm_where(images, weight, bias, norm_weight, norm_bias, mask, mask_token, patch_size=PATCH, eps=1e-5):
    """Patch embedding as one GEMM over reshaped patches, LayerNorm, then torch.where on the token mask."""
    batch, chans, height, width = images.shape
    gh, gw = height // patch_size, width // patch_size
    patches = images.view(batch, chans, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    x = patches.reshape(batch, gh * gw, -1) @ weight.reshape(weight.shape[0], -1).t() + bias
    x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    token_mask = mask.repeat_interleave(gh // mask.shape[1], 1).repeat_interleave(gw // mask.shape[2], 2)
    return torch.where(token_mask.reshape(batch, -1, 1), mask_token.reshape(1, 1, -1), x)


def torch_masked_blocks(features, weight, bias, images, mask, stride=BLOCK):
    """Decoder + L1 on the masked blocks only: gather their feature rows, one GEMM, compare with the
    matching image blocks (the same loss as reconstruction_l1, without full-resolution tensors)."""
    batch, dim, gh, gw = features.shape
    chans = images.shape[1]
    rows = mask.reshape(-1).nonzero().squeeze(1)
    feats = features.permute(0, 2, 3, 1).reshape(-1, dim)[rows]  # (n, D)
    logits = torch.addmm(bias, feats, weight.reshape(weight.shape[0], -1).t())  # (n, C*s*s)
    blocks = images.view(batch, chans, gh, stride, gw, stride).permute(0, 2, 4, 1, 3, 5).reshape(-1, chans * stride * stride)
    return (logits - blocks[rows]).abs().sum() / (rows.numel() * stride * stride + 1e-5) / chans


class _MaskedGemmsOnly(torch.autograd.Function):
    """The floor of any exact decoder_l1_loss: only its three GEMMs over the n masked blocks
    (logits n x O in the forward; g_features n x D and g_weight O x D in the backward), with a fixed
    sign matrix standing in for sign(recon - x). Not a loss: a timing reference."""

    @staticmethod
    def forward(ctx, feats, weight, bias, signs):
        ctx.save_for_backward(feats, weight, signs)
        return torch.addmm(bias, feats, weight.t()).sum()

    @staticmethod
    def backward(ctx, grad):
        feats, weight, signs = ctx.saved_tensors
        return signs @ weight, signs.t() @ feats, None, None


def gemm_floor(features, weight, bias, images, mask, stride=BLOCK):
    rows = mask.reshape(-1).nonzero().squeeze(1)
    feats = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])[rows]
    signs = torch.ones(rows.numel(), weight.shape[0], dtype=features.dtype, device=features.device)
    return _MaskedGemmsOnly.apply(feats, weight, bias, signs)


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    op: str
    batch: int
    shape: Dict[str, object]
    leaves: List[torch.Tensor]  # tensors that receive gradients
    run: Callable[[str], torch.Tensor]  # backend -> output
    grad_output: Optional[torch.Tensor]  # None for scalar losses
    min_bytes: Optional[Dict[str, int]] = None  # mode -> bytes that must move; None: compute-bound op


def make_case(op: str, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Case:
    from gfm_fast import ops
    from gfm_fast.masking import generate_block_mask
    from gfm_fast.ops import reference

    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dtype)  # noqa: E731
    mask = generate_block_mask(batch, IMG, block_size=BLOCK, ratio=RATIO, generator=gen).blocks.to(device)
    images = rand(batch, CHANS, IMG, IMG) if op != "cosine_distillation" else None  # large-batch cosine runs
    if op == "masked_patch_embed":
        k = CHANS * PATCH * PATCH
        leaves = [rand(EMBED, CHANS, PATCH, PATCH, scale=k ** -0.5), rand(EMBED, scale=0.1), 1 + rand(EMBED, scale=0.1),
                  rand(EMBED, scale=0.1), rand(1, 1, EMBED, scale=0.02)]
        impl = {"reference": reference.masked_patch_embed, "torch_gemm_where": torch_gemm_where}

        def run(backend):
            w, b, nw, nb, tok = leaves
            if backend in impl:
                return impl[backend](images, w, b, nw, nb, mask, tok, patch_size=PATCH)
            return ops.masked_patch_embed(images, w, b, nw, nb, mask, tok, patch_size=PATCH, backend=backend)

        grad_output = rand(batch, (IMG // PATCH) ** 2, EMBED)
        shape = {"images": [batch, CHANS, IMG, IMG], "patch": PATCH, "dim": EMBED, "mask": list(mask.shape)}
    elif op == "decoder_l1_loss":
        grid = IMG // BLOCK
        out_chans = BLOCK * BLOCK * CHANS
        leaves = [rand(batch, grid, grid, STAGE4_DIM), rand(out_chans, STAGE4_DIM, scale=STAGE4_DIM ** -0.5),
                  rand(out_chans, scale=0.1)]
        impl = {"reference": reference.decoder_l1_loss, "torch_masked_blocks": torch_masked_blocks,
                "gemm_floor": gemm_floor, "reference_compiled": torch.compile(reference.decoder_l1_loss)}

        def run(backend):
            # r comes out of timm's NHWC stage: the ops see an NHWC tensor as NCHW.
            features, weight, bias = leaves[0].permute(0, 3, 1, 2), leaves[1], leaves[2]
            if backend in impl:
                return impl[backend](features, weight, bias, images, mask, stride=BLOCK)
            return ops.decoder_l1_loss(features, weight, bias, images, mask, stride=BLOCK, backend=backend)

        grad_output = None
        shape = {"features_nhwc": [batch, grid, grid, STAGE4_DIM], "weight": [out_chans, STAGE4_DIM],
                 "images": [batch, CHANS, IMG, IMG], "mask": list(mask.shape)}
    elif op == "cosine_distillation":
        leaves = [rand(batch, FEAT_DIM)]
        teacher = rand(batch, FEAT_DIM)

        def run(backend):
            if backend == "reference":
                return reference.cosine_distillation(leaves[0], teacher)
            return ops.cosine_distillation(leaves[0], teacher, backend=backend)

        grad_output = None
        shape = {"student": [batch, FEAT_DIM], "teacher": [batch, FEAT_DIM]}
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    for leaf in leaves:
        leaf.requires_grad_()
    return Case(op, batch, shape, leaves, run, grad_output, _min_bytes(op, batch, dtype, mask))


def _min_bytes(op: str, batch: int, dtype: torch.dtype, mask: torch.Tensor) -> Optional[Dict[str, int]]:
    """Bytes each mode must move at the least (inputs read once, outputs written once):
    - masked_patch_embed forward: the pixels of unmasked patches (masked tokens become the mask
      token without reading theirs), all tokens written, the mask; backward: the tokens' gradient,
      the unmasked pixels again (weight gradient), the parameter gradients written.
    - cosine_distillation forward: z_s and z_t; backward: both again, grad z_s written.
    - decoder_l1_loss: None; its three GEMMs bound it, not memory (see its gemm_floor).
    'full' is forward + backward: in training the backward runs long after the forward."""
    elt = torch.empty((), dtype=dtype).element_size()
    if op == "masked_patch_embed":
        unmasked = 1.0 - mask.float().mean().item()
        pixels = int(unmasked * batch * CHANS * IMG * IMG) * elt
        tokens = batch * (IMG // PATCH) ** 2 * EMBED * elt
        params = (EMBED * CHANS * PATCH * PATCH + 4 * EMBED) * elt  # conv weight, bias, norm w/b, mask token
        forward = pixels + tokens + params + mask.numel()
        backward = tokens + pixels + params + mask.numel()
    elif op == "cosine_distillation":
        rows = batch * FEAT_DIM * elt
        forward, backward = 2 * rows, 3 * rows
    else:
        return None
    return {"forward": forward, "backward": backward, "full": forward + backward}


def _mode_fns(case: Case, backend: str, mode: str):
    """(setup, fn) for time_fn: setup clears gradients (and runs the forward for 'backward')."""
    state = {}

    def clear():
        state.pop("out", None)  # frees the last forward's graph outside the timed call
        for leaf in case.leaves:
            leaf.grad = None

    def forward():
        state["out"] = case.run(backend)

    def backward():
        state.pop("out").backward(case.grad_output)

    if mode == "forward":
        return clear, forward
    if mode == "backward":
        return (lambda: (clear(), forward())), backward
    return clear, (lambda: (forward(), backward()))


def _available_backends(op: str, device: torch.device) -> List[str]:
    from gfm_fast.ops import available_backends

    found = ["reference"] + BASELINES.get(op, []) + (GPU_BASELINES.get(op, []) if device.type == "cuda" else [])
    available = available_backends()
    return found + [b for b in ("cpp", "triton") if available[b][device.type]]


def bench_case(case: Case, backends: Sequence[str], mode: str, device: torch.device, warmup: int,
               runs: int, bandwidth: Optional[float] = None) -> List[Dict]:
    """Interleaved timing of one op x mode over backends; then each backend's peak memory."""
    fns = {b: _mode_fns(case, b, mode) for b in backends}
    for setup, fn in fns.values():  # warm-up: compile, autotune, allocator
        time_fn(fn, device=device, warmup=warmup, runs=1, setup=setup)
    samples = {b: [] for b in backends}
    for _ in range(runs):
        for b, (setup, fn) in fns.items():
            samples[b].append(time_fn(fn, device=device, warmup=0, runs=1, setup=setup).median_ms)
    grad_bytes = sum(leaf.numel() * leaf.element_size() for leaf in case.leaves) if mode != "forward" else 0
    batch = case.batch
    records = []
    for b, (setup, fn) in fns.items():
        setup()
        peak = peak_memory_bytes(fn, device=device)
        ms = samples[b]
        records.append({"case": case.op, "backend": b, "mode": mode, "batch": batch, "shape": case.shape,
                        "median_ms": statistics.median(ms), "p20_ms": _quantile(ms, 0.2), "p80_ms": _quantile(ms, 0.8),
                        "runs": runs, "images_per_s": batch / (statistics.median(ms) / 1e3), "peak_bytes": peak,
                        "grad_bytes": grad_bytes, "note": NOTES.get(f"{case.op}/{b}")})
    ref = next(r for r in records if r["backend"] == "reference")
    for r in records:
        r["speedup"] = ref["median_ms"] / r["median_ms"]
        r["peak_vs_reference"] = (r["peak_bytes"] / ref["peak_bytes"]) if ref["peak_bytes"] else None
        extra, ref_extra = r["peak_bytes"] - r["grad_bytes"], ref["peak_bytes"] - ref["grad_bytes"]
        r["extra_peak_vs_reference"] = (extra / ref_extra) if ref_extra > 0 else None
        if case.min_bytes is not None:
            r["min_bytes"] = case.min_bytes[mode]
            r["achieved_GBps"] = r["min_bytes"] / (r["median_ms"] / 1e3) / 1e9
            r["bandwidth_fraction"] = r["achieved_GBps"] * 1e9 / bandwidth if bandwidth else None
    return records


def run_ops(device="cpu", backends: Optional[Sequence[str]] = None, dtype: torch.dtype = torch.float32,
            batch: int = 16, ops: Sequence[str] = OPS, modes: Sequence[str] = MODES, warmup: int = 3,
            runs: int = 10, seed: int = 0) -> List[Dict]:
    """Benchmark the fused ops; one record per op x backend x mode (see the module docstring).

    Args:
        device: where to run.
        backends: subset of reference, the torch_* baselines, cpp, triton (default: all that run there;
            reference is always included as the baseline of the speedups).
        dtype: input dtype of every op.
        batch: B of GFM's shapes.
        ops, modes: what to measure.
        warmup, runs: discarded warm-up calls, then timed calls per backend (interleaved).
    """
    device = torch.device(device)
    env = environment(device)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    if bandwidth:
        env = {**env, "copy_bandwidth_GBps": bandwidth / 1e9}
    records = []
    for op in ops:
        chosen = _available_backends(op, device)
        if backends is not None:
            selectable = chosen + [b for b in GPU_BASELINES.get(op, []) if b not in chosen]
            chosen = ["reference"] + [b for b in selectable if b in backends and b != "reference"]
        case = make_case(op, batch, dtype, device, seed)
        for mode in modes:
            for record in bench_case(case, chosen, mode, device, warmup, runs, bandwidth):
                records.append({**record, "dtype": str(dtype).replace("torch.", ""), **env})
    return records


def machine() -> Dict[str, object]:
    """What the CPU numbers ran on: model, cores, SIMD level, load when the run started."""
    info: Dict[str, object] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                                 if line.startswith("model name"))
        info["load_average"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    return info


def print_table(records: List[Dict]) -> None:
    print_records(records, ["case", "backend", "mode", "batch", "dtype", "median_ms", "p20_ms", "p80_ms",
                            "images_per_s", "peak_MiB", "speedup", "extra_peak_vs_reference", "achieved_GBps",
                            "bandwidth_fraction"])


def fastest_fused_backends(records: List[Dict]) -> Dict[str, str]:
    """Per op, the fused backend with the lowest 'full' (forward + backward) median: what
    gfm_fast/ops/_backend.py GPU_PREFERENCE should say for this device."""
    best: Dict[str, Dict] = {}
    for r in records:
        if r["mode"] == "full" and r["backend"] in ("cpp", "triton"):
            if r["case"] not in best or r["median_ms"] < best[r["case"]]["median_ms"]:
                best[r["case"]] = r
    return {op: r["backend"] for op, r in best.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--batch", type=at_least(1), default=16)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--backends", nargs="+", help="default: every backend that runs on the device")
    parser.add_argument("--threads", type=at_least(1), help="CPU threads (default: all cores; recorded)")
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--runs", type=at_least(1), default=15)
    parser.add_argument("--out", help="JSON output (default benchmarks/results/<device>_ops_<dtype>_b<batch>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    records = run_ops(args.device, args.backends, dtype, args.batch, args.ops, args.modes, warmup=args.warmup,
                      runs=args.runs)
    print_table(records)
    fastest = fastest_fused_backends(records)
    print(f"fastest fused backend per op (forward + backward): {fastest}")
    out = Path(args.out or Path(__file__).parent / "results" / f"{torch.device(args.device).type}_ops_{args.dtype}_b{args.batch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device(args.device))
    out.write_text(json.dumps({"environment": env, "machine": machine(), "command": " ".join(sys.argv),
                               "notes": NOTES, "fastest_fused": fastest, "records": records}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
