"""The evaluation report: dataclasses, JSON, a console table, Markdown and confusion-matrix PNGs.

Per model and protocol: ``top1`` and ``macro_f1`` over all test predictions (with k-fold every image
is predicted once, by the fold that held it out), ``top1_std`` across folds, ``n_train`` (training
images per fold, mean), ``n_test`` (test predictions in all), ``majority_rate`` (the accuracy of
always answering the training fold's most frequent class: the floor to beat), and per fold the same
figures. Confusion matrices are written with Pillow (no plotting library needed).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

__all__ = ["FoldResult", "ProtocolResult", "ModelResult", "EvalReport"]

PROTOCOL_NAMES = {"knn": "k-NN", "linear": "linear"}


@dataclass
class FoldResult:
    """One fold (or the one split) of one protocol."""

    fold: int
    top1: float
    macro_f1: float
    n_train: int
    n_test: int
    majority_rate: float
    weight_decay: Optional[float] = None  # linear probe: the chosen L2 penalty


@dataclass
class ProtocolResult:
    """One protocol on one model, over all folds."""

    top1: float
    top1_std: float
    macro_f1: float
    n_train: int
    n_test: int
    majority_rate: float
    folds: List[FoldResult]
    confusion: List[List[int]]  # rows: true class, columns: predicted class


@dataclass
class ModelResult:
    """Everything measured on one model (the user's or a baseline)."""

    label: str
    kind: str  # model | random-init | teacher
    source: str
    architecture: str
    image_size: int
    stage: str  # "last (pooled)" or "stage S (mean over H, W)"
    feature_dim: int
    cached: bool
    seconds: float  # feature extraction (or cache read) wall time
    protocols: Dict[str, ProtocolResult] = field(default_factory=dict)


@dataclass
class EvalReport:
    """What ``gfm_fast.evaluate`` returns and ``python -m gfm_fast.eval`` prints and writes."""

    data: str
    classes: List[str]
    class_counts: Dict[str, int]
    n_images: int
    split: str  # how train and test were chosen
    settings: Dict[str, Any]
    models: List[ModelResult]
    skipped_unlabelled: int = 0

    def to_dict(self) -> Dict[str, Any]:
        """A plain, JSON-serialisable dict (non-finite numbers become None)."""
        return _finite(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def _rows(self) -> List[List[str]]:
        rows = []
        for model in self.models:
            for name, result in model.protocols.items():
                std = f"±{result.top1_std:.1%}" if len(result.folds) > 1 else ""
                rows.append([model.label, model.kind, PROTOCOL_NAMES.get(name, name), f"{result.top1:.1%}", std,
                             f"{result.macro_f1:.3f}", str(result.n_train), str(result.n_test),
                             f"{result.majority_rate:.1%}"])
        return rows

    _HEADER = ["model", "kind", "protocol", "top1", "std", "macro F1", "n_train", "n_test", "majority"]

    def _summary(self) -> str:
        counts = ", ".join(f"{name} {n}" for name, n in self.class_counts.items())
        skipped = f"; {self.skipped_unlabelled} unlabelled samples skipped" if self.skipped_unlabelled else ""
        return (f"{self.data}: {self.n_images} images, {len(self.classes)} classes ({counts}){skipped}; "
                f"{self.split}")

    def to_table(self) -> str:
        """A fixed-width table for the console."""
        rows = [self._HEADER] + self._rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._HEADER))]
        lines = [self._summary(), ""]
        for number, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
            if number == 0:
                lines.append("  ".join("-" * width for width in widths))
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """The summary table, the settings and the per-fold figures as Markdown."""
        def table(header: List[str], rows: List[List[str]]) -> List[str]:
            return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
                "| " + " | ".join(row) + " |" for row in rows]

        lines = ["# Evaluation", "", self._summary(), ""]
        lines += table(self._HEADER, self._rows()) + [""]
        lines += ["## Settings", ""] + [f"- {key}: {value}" for key, value in self.settings.items()] + [""]
        lines += table(["model", "architecture", "input", "feature", "dim", "features from", "seconds"],
                       [[m.label, m.architecture, f"{m.image_size} px", m.stage, str(m.feature_dim),
                         "cache" if m.cached else "extraction", f"{m.seconds:.1f}"] for m in self.models]) + [""]
        fold_rows = [[m.label, PROTOCOL_NAMES.get(name, name), str(f.fold), f"{f.top1:.1%}", f"{f.macro_f1:.3f}",
                      str(f.n_train), str(f.n_test), f"{f.majority_rate:.1%}",
                      "" if f.weight_decay is None else f"{f.weight_decay:g}"]
                     for m in self.models for name, r in m.protocols.items() for f in r.folds]
        lines += ["## Per fold", ""] + table(["model", "protocol", "fold", "top1", "macro F1", "n_train", "n_test",
                                              "majority", "weight decay"], fold_rows)
        return "\n".join(lines) + "\n"

    def write(self, json_path: Union[str, Path]) -> List[Path]:
        """Write ``json_path``, the Markdown beside it (``.md``) and one confusion-matrix PNG per model
        (``<stem>.confusion.<model>.png``). Returns the paths written."""
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(self.to_json())
        markdown = json_path.with_suffix(".md") if json_path.suffix != ".md" else json_path.with_suffix(".report.md")
        markdown.write_text(self.to_markdown())
        written = [json_path, markdown]
        for model in self.models:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.label).strip("_")
            png = json_path.with_name(f"{json_path.stem}.confusion.{slug}.png")
            confusion_image(model, self.classes).save(png)
            written.append(png)
        return written


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Confusion-matrix image (Pillow)
# --------------------------------------------------------------------------------------------

_MARGIN, _TITLE = 12, 30
_LOW, _HIGH = np.array([247, 251, 255]), np.array([8, 48, 107])  # white to dark blue, by row share


def _panel(matrix: np.ndarray, classes: List[str], title: str):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    count = len(classes)
    cell = int(max(14, min(40, 640 // max(count, 1))))
    names = [f"{i} {name[:20]}" for i, name in enumerate(classes)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(probe.textlength(n, font=font)) for n in names) + 8
    grid = cell * count
    footer = "rows: true class, columns: predicted"
    width = _MARGIN * 2 + max(label_width + grid, int(probe.textlength(title, font=font)),
                              int(probe.textlength(footer, font=font)))
    height = _MARGIN * 2 + _TITLE + 14 + grid + 18
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_MARGIN, _MARGIN), title, fill="black", font=font)
    left, top = _MARGIN + label_width, _MARGIN + _TITLE + 14
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for row in range(count):
        draw.text((_MARGIN, top + row * cell + (cell - 10) // 2), names[row], fill="black", font=font)
        draw.text((left + row * cell + 2, top - 14), str(row), fill="black", font=font)
        for col in range(count):
            colour = tuple(int(c) for c in _LOW + (_HIGH - _LOW) * shares[row, col])
            box = (left + col * cell, top + row * cell, left + (col + 1) * cell - 1, top + (row + 1) * cell - 1)
            draw.rectangle(box, fill=colour)
            if cell >= 18 and matrix[row, col]:
                ink = "white" if shares[row, col] > 0.5 else "black"
                draw.text((box[0] + 2, box[1] + (cell - 10) // 2), str(int(matrix[row, col])), fill=ink, font=font)
    draw.text((_MARGIN, top + grid + 4), footer, fill="gray", font=font)
    return image


def confusion_image(model: ModelResult, classes: List[str]):
    """One PIL image with a confusion matrix per protocol of ``model``, side by side."""
    from PIL import Image

    panels = [_panel(np.array(result.confusion), classes,
                      f"{model.label} - {PROTOCOL_NAMES.get(name, name)}: top1 {result.top1:.1%}")
              for name, result in model.protocols.items()]
    image = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        image.paste(panel, (x, 0))
        x += panel.width
    return image
