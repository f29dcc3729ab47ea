"""Labelled image sets for evaluation: class folders (with shipped split files) and WebDataset shards.

Layouts read by :func:`open_dataset`:

* class folders, ``root/<class>/<image>`` (UC Merced, RESISC45, EuroSAT, AID, PatternNet): every
  image under a class folder, nested folders included, belongs to that class. A root whose only
  entry is one folder of class folders (``UCMerced_LandUse/Images/<class>/``) is descended into.
* shipped split files beside the class folders: ``train.txt`` and ``test.txt`` (also
  ``<name>-train.txt`` / ``<name>_test.txt``, as torchgeo ships for UC Merced and EuroSAT), one
  image per line, as a path relative to the root or a bare file name; ``val.txt`` joins the
  training side. Labels still come from the class folders; images not listed are not used.
* WebDataset shards (a build directory with ``manifest.json``, a ``.tar`` file, a brace pattern or
  URL list): each sample's image and its class from ``<key>.cls`` (the class index as text) or
  ``<key>.json`` (``label``, ``cls`` or ``class``), as ``python -m gfm_fast.data build`` writes
  for class-folder sources. Samples without a label (flat sources) are skipped and counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from gfm_fast.data.decode import IMAGE_EXTENSIONS, CorruptSample, EncodedImage, find_image
from gfm_fast.errors import GFMError

__all__ = ["EvalError", "Sample", "LabelledImages", "open_dataset"]

SPLIT_SIDES = {"train": "train", "val": "train", "test": "test"}  # a shipped val split is training data here
_SPLIT_FILE = re.compile(r"^(?:.*[-_])?(train|val|test)\.txt$")
_LABEL_KEYS = ("label", "cls", "class")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


class EvalError(GFMError, ValueError):
    """Evaluation cannot run on this input (data, model, stage or option); the message says how to fix it."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file on disk, or the encoded bytes of a shard sample."""

    name: str  # path relative to the data root, or the shard sample key: named in errors
    label: int
    ext: str  # image format by extension, lower case, no dot
    path: Optional[Path] = None
    data: Optional[bytes] = None


@dataclass
class LabelledImages:
    """A labelled image set.

    Attributes:
        source: what the user passed (directory, shard spec).
        samples: the images, in a stable order.
        classes: class names; ``Sample.label`` indexes this list.
        split: (train indices, test indices) from shipped split files, else None.
        skipped_unlabelled: shard samples without a class label (not evaluated).
    """

    source: str
    samples: List[Sample]
    classes: List[str]
    split: Optional[Tuple[np.ndarray, np.ndarray]] = None
    skipped_unlabelled: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def class_counts(self) -> Dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts)}

    def fingerprint(self) -> str:
        """A digest of the listing (names, labels, and each file's size and mtime or each shard
        sample's bytes) and of the split: changes whenever any image or label does."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for sample in self.samples:
            if sample.path is not None:
                stat = sample.path.stat()
                content = f"{stat.st_size}:{stat.st_mtime_ns}"
            else:
                content = hashlib.blake2b(sample.data, digest_size=16).hexdigest()
            digest.update(json.dumps([sample.name, sample.label, content]).encode())
        if self.split is not None:
            digest.update(json.dumps([self.split[0].tolist(), self.split[1].tolist()]).encode())
        return digest.hexdigest()

    def read(self, index: int, in_chans: int) -> np.ndarray:
        """Decode image ``index`` to (H, W, C) pixels, C == in_chans (or 1: gray for a 3-band model).

        Raises:
            EvalError: the image cannot be read or its bands do not fit the model (names the image).
        """
        sample = self.samples[index]
        try:
            data = sample.data if sample.data is not None else sample.path.read_bytes()
            return EncodedImage(data, sample.ext).decode(in_chans)
        except (CorruptSample, OSError) as exc:
            where = sample.path if sample.path is not None else f"{sample.name} in {self.source}"
            raise EvalError(f"cannot read image {where}: {exc}; remove or replace it") from None


# --------------------------------------------------------------------------------------------
# Class folders
# --------------------------------------------------------------------------------------------

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _subdirs(directory: Path) -> List[Path]:
    return sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_under(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if _is_image(p) and not any(
        part.startswith(".") for part in p.relative_to(directory).parts))


def _class_root(root: Path) -> Path:
    """``root``, or the single folder of class folders inside it (e.g. ``UCMerced_LandUse/Images``)."""
    while True:
        dirs = _subdirs(root)
        if len(dirs) != 1 or any(_is_image(p) for p in root.iterdir()):
            return root
        inner = dirs[0]
        if any(_is_image(p) for p in inner.iterdir()) or not _subdirs(inner):
            return root  # ``inner`` is a class folder itself (a one-class set)
        root = inner


def _read_class_folders(root: Path) -> LabelledImages:
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise EvalError(f"--data {root} {problem}; expected a folder of class folders (DIR/<class>/<image>) or "
                        f"WebDataset shards")
    base = _class_root(root)
    per_class = [(d.name, _images_under(d)) for d in _subdirs(base)]
    per_class = [(name, files) for name, files in per_class if files]
    if not per_class:
        loose = any(_is_image(p) for p in base.iterdir())
        hint = (" (it holds images directly: move each class's images into DIR/<class>/)" if loose else "")
        raise EvalError(f"--data {base} has no labelled images{hint}; expected DIR/<class>/<image> with image types "
                        f"{', '.join(IMAGE_EXTENSIONS)}")
    if len(per_class) == 1:
        raise EvalError(f"--data {base} has a single class ({per_class[0][0]}); a classification needs at least two "
                        f"class folders DIR/<class>/<image>")
    samples = [Sample(path.relative_to(base).as_posix(), label, path.suffix.lower().lstrip("."), path=path)
               for label, (_, files) in enumerate(per_class) for path in files]
    dataset = LabelledImages(str(root), samples, [name for name, _ in per_class])
    split_files = _split_files(base) or (_split_files(root) if root != base else {})
    return _apply_split(dataset, split_files) if split_files else dataset


def _split_files(directory: Path) -> Dict[str, List[Path]]:
    found: Dict[str, List[Path]] = {}
    for path in sorted(directory.iterdir()):
        match = _SPLIT_FILE.match(path.name)
        if match and path.is_file():
            found.setdefault(SPLIT_SIDES[match.group(1)], []).append(path)
    if found and set(found) != {"train", "test"}:
        present = ", ".join(p.name for files in found.values() for p in files)
        raise EvalError(f"{directory} has split file(s) {present} but not both a train and a test list; add the "
                        f"missing one or remove them to use a seeded stratified split")
    return found


def _apply_split(dataset: LabelledImages, split_files: Dict[str, List[Path]]) -> LabelledImages:
    """Keep the images the split files list (train first, then test) and record the split."""
    by_path = {s.name: i for i, s in enumerate(dataset.samples)}
    by_name: Dict[str, List[int]] = {}
    for i, sample in enumerate(dataset.samples):
        by_name.setdefault(Path(sample.name).name, []).append(i)
    sides: Dict[str, List[int]] = {"train": [], "test": []}
    for side, files in split_files.items():
        for file in files:
            for number, line in enumerate(file.read_text().splitlines(), 1):
                entry = line.strip().split(",")[0].split()[0] if line.strip() else ""
                if not entry or entry.startswith("#"):
                    continue
                index = by_path.get(entry.removeprefix("./"))
                if index is None and len(by_name.get(entry, [])) == 1:
                    index = by_name[entry][0]
                if index is None:
                    why = "is ambiguous (several images have that name)" if by_name.get(entry) else "is not an image " \
                          "under a class folder"
                    raise EvalError(f"{file}:{number}: {entry!r} {why}; list images as paths relative to the data root")
                sides[side].append(index)
    overlap = set(sides["train"]) & set(sides["test"])
    if overlap:
        raise EvalError(f"split files list {len(overlap)} image(s) in both train and test, e.g. "
                        f"{dataset.samples[min(overlap)].name}")
    order = sides["train"] + sides["test"]
    samples = [dataset.samples[i] for i in order]
    n_train = len(sides["train"])
    split = (np.arange(n_train), np.arange(n_train, len(order)))
    return LabelledImages(dataset.source, samples, dataset.classes, split)


# --------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------

def _is_shard_spec(data: str) -> bool:
    path = Path(os.path.expanduser(data))
    if path.is_dir():
        return (path / "manifest.json").is_file()
    return path.suffix == ".tar" or path.name == "manifest.json" or "{" in data or "," in data or bool(
        _URL.match(data))


def _shard_label(sample: Dict[str, bytes], where: str) -> Optional[str]:
    if "cls" in sample:
        return sample["cls"].decode().strip()
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as exc:
            raise EvalError(f"{where}: its .json is not valid JSON ({exc})") from None
        for key in _LABEL_KEYS:
            if isinstance(meta, dict) and meta.get(key) is not None:
                return str(meta[key])
    return None


def _shard_samples(urls: Sequence[str]) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    from webdataset.gopen import gopen
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys

    from gfm_fast.data.pipeline import tar_members

    for url in urls:
        try:
            with gopen(url, "rb") as stream:
                for sample in group_by_keys(tar_members(stream, url), handler=reraise_exception):
                    yield url, sample
        except EvalError:
            raise
        except Exception as exc:  # unreachable, truncated, not a tar
            raise EvalError(f"cannot read shard {url}: {type(exc).__name__}: {exc}") from None


def _class_order(names: Sequence[str]) -> List[str]:
    """Sorted class names; numerically when every name is an integer (``cls`` indices)."""
    unique = set(names)
    if all(re.fullmatch(r"-?\d+", n) for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _read_shards(spec: str) -> LabelledImages:
    from gfm_fast.data.shards import resolve_shards

    try:
        urls = resolve_shards(spec).urls
    except (OSError, ValueError) as exc:
        raise EvalError(f"--data {spec}: {exc}") from None
    entries: List[Tuple[str, str, str, bytes]] = []
    skipped = 0
    for url, sample in _shard_samples(urls):
        where = f"shard sample {sample.get('__key__')!r} in {url}"
        label = _shard_label(sample, where)
        if label is None:
            skipped += 1
            continue
        try:
            ext, data = find_image(sample)
        except CorruptSample as exc:
            raise EvalError(f"cannot read image {where}: {exc}") from None
        entries.append((sample["__key__"], label, ext, data))
    classes = _class_order([label for _, label, _, _ in entries])
    if not entries:
        raise EvalError(f"--data {spec} has no labelled samples ({skipped} without a label); store each sample's "
                        f"class as <key>.cls or as \"label\" in <key>.json")
    if len(classes) == 1:
        raise EvalError(f"--data {spec} has a single class ({classes[0]}); a classification needs at least two")
    index = {name: i for i, name in enumerate(classes)}
    samples = [Sample(key, index[label], ext, data=data) for key, label, ext, data in sorted(entries)]
    return LabelledImages(spec, samples, classes, skipped_unlabelled=skipped)


def open_dataset(data: Union[str, os.PathLike, LabelledImages]) -> LabelledImages:
    """List a labelled image set (see the module docstring for the layouts).

    Args:
        data: a class-folder root, a shard spec, or an already opened set (returned as is).

    Raises:
        EvalError: empty set, a single class, unreadable shards, inconsistent split files.
    """
    if isinstance(data, LabelledImages):
        return data
    text = os.fspath(data)
    if _is_shard_spec(text):
        return _read_shards(text)
    return _read_class_folders(Path(os.path.expanduser(text)))
