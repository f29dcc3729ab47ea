"""The frozen ImageNet-22k teacher: Swin-B 224/window 7, stages 1-3 only (docs/method.md, "Models").

Frozen by construction, not by path strings: the parameters never require grad, the module is
always in eval mode (``train()`` cannot switch it), it lives outside the DeepSpeed engine and runs
under ``torch.no_grad()`` in the run's precision, its weights cast once. What GFM never runs
(last-stage blocks, final norm, head) is deleted, so it costs no memory and is absent from the state
dict.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer

from gfm_fast.config import ModelConfig
from gfm_fast.models.attention import set_attention
from gfm_fast.models.checkpoint import load_teacher_weights
from gfm_fast.models.linear import set_bf16_matmul
from gfm_fast.models.swin import pad_before_shift, prune_to_trunk, split_at_last_merging, swin_kwargs
from gfm_fast.ops._common import memory_stamp

__all__ = ["FrozenTeacher", "resolve_teacher_dtype"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The teacher's dtype in a run at each run.precision (teacher_dtype=auto): the student's compute dtype.
_RUN_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
                         "fp16": torch.float16}


def resolve_teacher_dtype(name: str, precision: str) -> torch.dtype:
    """The teacher's compute dtype in a run: ``teacher_dtype`` when set, else (``auto``) the run's
    precision: bf16 for ``bf16`` and ``bf16-mixed`` (on CPU as on GPU), fp16 for ``fp16``, else fp32."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"teacher_dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
        return _DTYPES[name]
    if precision not in _RUN_PRECISION_DTYPES:
        raise ValueError(f"run precision must be one of {', '.join(_RUN_PRECISION_DTYPES)}; got {precision!r}")
    return _RUN_PRECISION_DTYPES[precision]


class FrozenTeacher(SwinTransformer):
    """timm Swin pruned to h (stages 1-3 through the third patch merging), frozen.

    Args:
        config: the model config; uses ``teacher`` (architecture), ``teacher_weights`` (a local
            file in the official Swin or timm layout; None gives a random teacher and a warning),
            ``teacher_bands`` and ``teacher_dtype``.
        state_dict: weights already in memory (any layout ``checkpoint_filter_fn`` maps); takes
            precedence over ``config.teacher_weights``.
    """

    def __init__(self, config: ModelConfig, *, state_dict: Optional[Dict[str, torch.Tensor]] = None):
        cfg = config.teacher
        cfg.validate("model.teacher")
        super().__init__(**swin_kwargs(cfg))
        pad_before_shift(self)  # the official Swin's order wherever the window does not tile a stage
        set_attention(self, config.attention_path)
        set_bf16_matmul(self, config.bf16_matmul)
        prune_to_trunk(self)
        self.bands = tuple(int(b) for b in config.teacher_bands)
        self.dtype_name = config.teacher_dtype
        resolve_teacher_dtype(self.dtype_name, "fp32")  # validate early
        weights = state_dict if state_dict is not None else config.teacher_weights
        if weights is not None:
            load_teacher_weights(self, weights)
        else:
            warnings.warn("GFM teacher has NO weights (model.teacher_weights is None): it is randomly initialised, "
                          "so the distillation loss is meaningless. Pass the ImageNet-22k Swin-B checkpoint "
                          "(swin_base_patch4_window7_224_22k.pth) as model.teacher_weights for real pretraining.",
                          UserWarning, stacklevel=2)
        self.requires_grad_(False)
        self.eval()
        self._graph: Optional[_TeacherGraph] = None  # use_cuda_graph
        if self.dtype_name != "auto":  # a fixed dtype: cast the weights once, here
            self.to(_DTYPES[self.dtype_name])

    def set_run_precision(self, precision: str) -> torch.dtype:
        """Cast the weights once to the compute dtype of a run at ``precision`` (run.precision after
        ``auto`` is resolved), so that no step casts them again; returns that dtype."""
        dtype = resolve_teacher_dtype(self.dtype_name, precision)
        self.to(dtype)
        return dtype

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """What the next forward computes in: ``teacher_dtype`` when set; else (auto) the caller's
        autocast dtype on ``device`` when autocast is on, else the weights' dtype."""
        if self.dtype_name != "auto":
            return _DTYPES[self.dtype_name]
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.patch_embed.proj.weight.dtype

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Always eval: the teacher has no dropout/drop-path to enable and must never change."""
        return super().train(False)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Student images (B, C, H, W) -> teacher input: ``teacher_bands`` channels, bilinearly resized
        (align_corners=True, as GFM) to the teacher's image size."""
        if images.dim() != 4:
            raise ValueError(f"teacher input must be (B, C, H, W), got {tuple(images.shape)}")
        if max(self.bands) >= images.shape[1]:
            raise ValueError(f"teacher_bands {self.bands} do not exist in {images.shape[1]}-channel images")
        if self.bands != tuple(range(images.shape[1])):
            images = images[:, list(self.bands)]
        size = tuple(self.patch_embed.img_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
        return images

    def use_cuda_graph(self, enabled: bool = True) -> None:
        """Replay the forward as a CUDA graph on CUDA inputs (``run.teacher_cuda_graph``): captured
        at the first call, again when the input's shape, dtype or device, the autocast state or a
        weight (replaced or written in place) changes; CPU inputs run eagerly."""
        self._graph = _TeacherGraph() if enabled else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """z_t = average over tokens of h, (B, T) float32 (T = 1024 for Swin-B), no autograd graph.

        Args:
            images: normalised student images (B, C, H, W) NCHW; any float dtype.
        """
        if self._graph is not None and images.is_cuda and not torch.cuda.is_current_stream_capturing():
            return self._graph(self, images)
        return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        weights = self.patch_embed.proj.weight.dtype
        dtype = self.compute_dtype(images.device)
        # no_grad, not inference_mode: the cosine loss saves z_t for its backward. Weights already in
        # the compute dtype run as they are (an ambient autocast would only add casts, and run norms
        # and the attention bias in fp32); otherwise autocast casts them on the fly (autocast has no
        # fp32 mode: weights cast to 16 bits by the user then run as they are).
        autocast = dtype != weights and dtype in (torch.bfloat16, torch.float16)
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=autocast):
            x = self.prepare_images(images).to(weights)
            x = self.patch_embed(x)  # (B, 56, 56, 128) NHWC
            trunk, _, _ = split_at_last_merging(self)
            for module in trunk:
                x = module(x)  # h: (B, 7, 7, 1024) NHWC at the end
            return x.float().mean(dim=(1, 2))


class _TeacherGraph:
    """The teacher's forward captured once as a CUDA graph and replayed: one launch for its ~300
    kernels, where every step has the same shapes. The input is copied into the graph's static
    input; the output is cloned out of its static output (the next replay overwrites it)."""

    def __init__(self):
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.key: tuple = ()

    def __call__(self, teacher: FrozenTeacher, images: torch.Tensor) -> torch.Tensor:
        device = images.device.type
        # The graph reads the weights where they were, and caches made from them (the attention
        # bias) as they were: replaced or rewritten weights need a new capture.
        tensors = [*teacher.parameters(), *teacher.buffers()]
        key = (tuple(images.shape), images.dtype, images.device, torch.is_autocast_enabled(device),
               torch.get_autocast_dtype(device), tuple(memory_stamp(t) for t in tensors))
        if self.graph is None or key != self.key:
            self._capture(teacher, images, key)
        self.images.copy_(images)
        self.graph.replay()
        return self.features.clone()

    def _capture(self, teacher: FrozenTeacher, images: torch.Tensor, key: tuple) -> None:
        self.graph = self.images = self.features = None  # free the previous capture first
        self.images = images.clone()
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):  # warm-up off the capture: fills the caches, picks the kernels
            for _ in range(2):
                teacher._features(self.images)
        torch.cuda.current_stream(images.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local, as torch.compile's own CUDA graphs capture: unsafe CUDA calls (cudaMalloc,
        # cudaHostAlloc) are forbidden in this thread only. In the default "global" mode a DataLoader's
        # pin-memory thread, pinning the next batches meanwhile, invalidates the capture and fails itself.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.features = teacher._features(self.images)
        self.graph, self.key = graph, key
