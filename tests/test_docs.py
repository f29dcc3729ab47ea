"""The documentation says what the code does: README.md and docs/*.md against the repository.

Checks what can be checked without running anything heavy: every config key, repository path,
``gfm_fast.*`` name, relative link and result JSON the docs name exists; docs/architecture.md's
module map lists exactly the package's modules and its table allows every import the source makes;
the README's step table matches the JSONs it cites; the Sentinel-2 band order is SSL4EO-S12's.
Nothing in the repository cites files users never see.
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import itertools
import json
import re
import subprocess
from pathlib import Path

import pytest

from gfm_fast import config as config_module

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FUSED_OPS = ("masked_patch_embed", "decoder_l1_loss", "cosine_distillation")
CPU_KERNELS = FUSED_OPS + ("window_attention", "widened_linear")
RESULTS = ROOT / "benchmarks" / "results"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _config_keys() -> set:
    """Every ``section.key`` (and ``model.student.key`` / ``model.teacher.key``) of TrainConfig."""
    keys = set()

    def walk(cls, prefix):
        for field in dataclasses.fields(cls):
            keys.add(prefix + field.name)
            if field.name in ("student", "teacher"):
                walk(config_module.SwinConfig, f"{prefix}{field.name}.")

    for field in dataclasses.fields(config_module.TrainConfig):
        walk(field.type if isinstance(field.type, type) else getattr(config_module, field.type), f"{field.name}.")
    return keys


# `model.alpha`, `run.max_steps=10`, `data.source_weights={...}`: inside backticks, not part of a
# longer dotted name (gfm_fast.data.make_loader, timm.data.resolve_data_config).
CONFIG_KEY = re.compile(r"`(?:[^`]*?[\s(=])?((?:model|data|optim|run)\.[a-z_0-9]+(?:\.[a-z_0-9]+)?)(?=[=`\s,)\]])")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_config_keys_named_in_the_docs_exist(doc):
    known = _config_keys()
    named = {m for m in CONFIG_KEY.findall(_text(doc)) if not m.endswith((".safetensors", ".json", ".yaml"))}
    assert named, f"{doc.name}: the pattern found no config keys at all"
    unknown = sorted(k for k in named if k not in known)
    assert not unknown, f"{doc.name} names config keys that gfm_fast/config.py does not define: {unknown}"


REPO_PATH = re.compile(
    r"(?<![\w/.<-])((?:gfm_fast|benchmarks|configs|docs|scripts|tests|csrc|kernels)/[\w./<>{},*-]*[\w*])")


def _expand(path: str):
    """A doc path with ``<op>``, ``{a,b}`` or ``*`` -> the concrete paths it stands for."""
    if "<op>" in path:
        ops = CPU_KERNELS if path.startswith("csrc/cpu/") else FUSED_OPS
        return list(itertools.chain.from_iterable(_expand(path.replace("<op>", op)) for op in ops))
    brace = re.search(r"\{([^{}]*)\}", path)
    if brace:
        return list(itertools.chain.from_iterable(
            _expand(path[:brace.start()] + alt + path[brace.end():]) for alt in brace.group(1).split(",")))
    return [path]


def _exists(path: str) -> bool:
    if "*" in path:
        return bool(glob.glob(str(ROOT / path)))
    return (ROOT / path).exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_repository_paths_named_in_the_docs_exist(doc):
    text = _text(doc)
    missing = []
    for raw in sorted(set(REPO_PATH.findall(text))):
        path = raw.split("::")[0]
        if "<" in path and "<op>" not in path:  # a placeholder such as benchmarks/results/<card>_...
            continue
        missing += [p for p in _expand(path) if not _exists(p)]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


PYTHON_NAME = re.compile(r"(?<![\w/.])gfm_fast(?:\.[A-Za-z_]\w*)+(?![\w/])")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_names_in_the_docs_resolve(doc):
    """``gfm_fast.ops.window_attention``, ``gfm_fast.eval.knn_accuracy``, ...: each is importable."""
    unresolved = []
    for name in sorted(set(PYTHON_NAME.findall(_text(doc)))):
        if name.endswith((".cpp", ".py", ".so")):  # a file (csrc/gfm_fast.cpp), not a Python name
            continue
        # As a user reaches it: attributes first (``gfm_fast.train`` is the function), importing a
        # submodule only where no attribute exists yet (importing gfm_fast/train.py would rebind
        # ``gfm_fast.train`` to that module for every later test).
        parts = name.split(".")
        obj = importlib.import_module(parts[0])
        for depth in range(1, len(parts)):
            try:
                obj = getattr(obj, parts[depth])
            except AttributeError:
                try:
                    obj = importlib.import_module(".".join(parts[:depth + 1]))
                except ImportError:
                    unresolved.append(name)
                    break
    assert not unresolved, f"{doc.name} names Python objects that do not exist: {unresolved}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", _text(path), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(doc):
    broken = []
    for target in LINK.findall(_text(doc)):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part) if file_part else doc
        if not path.exists() or (anchor and anchor not in _anchors(path)):
            broken.append(target)
    assert not broken, f"{doc.name} has links to files or headings that do not exist: {broken}"


def _module_map() -> dict:
    """docs/architecture.md's module map: {directory: set of file names listed for it}."""
    text = _text(ROOT / "docs" / "architecture.md")
    section = text.split("\n## Module map\n", 1)[1].split("\n## ", 1)[0]
    listed: dict = {}
    for item in re.split(r"\n- ", section):
        item = item.split("\n\n", 1)[0]  # the list ends at the next paragraph
        head = re.match(r"`([\w/]+/)`", item.strip("- \n"))
        if not head:
            continue
        directory = head.group(1).rstrip("/")
        directory = {"gfm_fast": "gfm_fast", "kernels": "kernels", "csrc": "csrc"}.get(
            directory, f"gfm_fast/{directory}")
        names = set(re.findall(r"`([\w<>/]+\.(?:py|cpp|cu|cuh|h))`", item))
        expanded = set()
        for name in names:
            for op in (CPU_KERNELS if name.startswith("cpu/") else FUSED_OPS) if "<op>" in name else [None]:
                expanded.add(name.replace("<op>", op) if op else name)
        listed[directory] = expanded
    return listed


def test_module_map_lists_every_module_and_only_existing_ones():
    listed = _module_map()
    assert set(listed) >= {"gfm_fast", "gfm_fast/ops", "gfm_fast/models", "gfm_fast/data", "gfm_fast/training",
                           "gfm_fast/eval", "kernels", "csrc"}
    for directory, names in listed.items():
        base = ROOT / directory
        if directory == "csrc":
            actual = {str(p.relative_to(base)) for p in base.rglob("*") if p.suffix in (".cpp", ".cu", ".cuh", ".h")}
        else:
            actual = {p.name for p in base.glob("*.py")}
        names, actual = names - {"__init__.py"}, actual - {"__init__.py"}  # every package has one
        assert names == actual, (f"docs/architecture.md's module map for {directory}/ disagrees with the files: "
                                 f"missing {sorted(actual - names)}, not there {sorted(names - actual)}")


LAYERS = ("errors", "config", "masking", "ops", "losses", "kernels", "_C", "data", "models", "training", "train",
          "features", "features_cli", "eval", "export", "run_dir", "_lazy")


def _documented_imports() -> dict:
    """docs/architecture.md's table: {layer: the layers it may import} (a row's layers share theirs)."""
    text = _text(ROOT / "docs" / "architecture.md")
    table = text.split("| package / module | role | imports from gfm_fast |", 1)[1].split("\n\n", 1)[0]
    allowed = {}
    for line in table.strip().splitlines()[1:]:
        first, *_, last = [c.strip() for c in line.strip().strip("|").split("|")]
        rows = {re.sub(r"\.py$|/$", "", name) for name in re.findall(r"`([\w/.]+)`", first)}
        may = {name for name in re.findall(r"\w+", last) if name in LAYERS}
        for layer in rows:
            allowed[layer] = may | rows
    return allowed


def _actual_imports() -> dict:
    """{layer: the gfm_fast layers its modules import}, from the source (the package root and its
    ``__version__`` left out: every layer may read those)."""
    found: dict = {}
    package = ROOT / "gfm_fast"
    files = [p for p in package.rglob("*.py") if "sample" not in p.parts and "kernels" not in p.parts]
    files += [p for p in (ROOT / "kernels").glob("*.py")]
    for path in files:
        parts = ["kernels", path.stem] if path.parent.name == "kernels" else list(
            path.relative_to(package).with_suffix("").parts)
        layer = parts[0]
        package_parts = ["gfm_fast"] + (parts if path.name == "__init__.py" else parts[:-1])
        if path.name == "__init__.py":
            package_parts = package_parts[:-1]
        for node in ast.walk(ast.parse(_text(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package_parts[:len(package_parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if base == "gfm_fast" else base for alias in node.names]
            else:
                continue
            for target in targets:
                names = target.split(".")
                if names[0] == "gfm_fast" and len(names) > 1 and names[1] in LAYERS and names[1] != layer:
                    found.setdefault(layer, set()).add(names[1])
    return found


def test_imports_follow_the_documented_layers():
    allowed = _documented_imports()
    assert {"ops", "models", "data", "training", "config", "errors"} <= set(allowed)
    wrong = {layer: sorted(imported - allowed.get(layer, set()) - {"_lazy"})
             for layer, imported in _actual_imports().items()}
    wrong = {layer: names for layer, names in wrong.items() if names}
    assert not wrong, f"imports that docs/architecture.md's table does not allow: {wrong}"


RESULT_JSON = re.compile(r"`(?:benchmarks/results/)?((?:cpu|loader|scaling)_[\w*]+\.json)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cited_result_files_are_committed(doc):
    cited = set(RESULT_JSON.findall(_text(doc)))
    missing = sorted(name for name in cited if not glob.glob(str(RESULTS / name)))
    assert not missing, f"{doc.name} cites results that benchmarks/results/ does not hold: {missing}"


def _step_rows(readme: str):
    """The README's step table: (json name, precision, [(side, img/s text, speedup text)], MFU texts)."""
    table = readme.split("| step (`benchmarks/results/`)", 1)[1].split("\n\n", 1)[0]
    current = None
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        named = re.search(r"`(cpu_step_\w+\.json)`", cells[0])
        current = named.group(1) if named else current
        sides = []
        for side, cell in zip(("reference", "ours", "ours+fused_adamw"), cells[2:5]):
            match = re.match(r"([\d.]+) img/s(?: \(([\d.]+)x\))?", cell)
            sides.append((side, match.group(1), match.group(2)))
        yield current, cells[1], sides, re.findall(r"(\d+)%", cells[5])


def _close(shown: str, value: float) -> bool:
    """``shown`` is ``value`` rounded to the digits it shows."""
    digits = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - value) <= 0.5 * 10 ** -digits + 1e-9


def test_readme_step_table_matches_its_json():
    rows = list(_step_rows(_text(ROOT / "README.md")))
    assert len(rows) >= 4
    for name, precision, sides, mfus in rows:
        records = {(r["side"], r["precision"]): r for r in json.loads(_text(RESULTS / name))["records"]}
        for side, images_per_s, speedup in sides:
            record = records[(side, precision)]
            assert _close(images_per_s, record["images_per_s"]), (name, precision, side, images_per_s)
            if speedup is not None:
                assert _close(speedup, record["speedup"]), (name, precision, side, speedup)
        for side, shown in zip(("reference", "ours+fused_adamw"), mfus):
            assert _close(shown, 100 * records[(side, precision)]["mfu"]), (name, precision, side, shown)


def _repository_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if ".git" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in (".py", ".md", ".sh", ".cpp", ".cu", ".h", ".cuh",
                                                             ".yaml", ".txt", ".cfg", ".toml")]


def test_no_file_cites_files_users_never_see():
    # The project's internal notes are not shipped; docs/method.md and docs/architecture.md are.
    pattern = re.compile(r"GFM\.md|STYLE\.md|(?<![\w/.-])shared/")
    this = Path(__file__).resolve()
    offenders = [str(p.relative_to(ROOT)) for p in _repository_files()
                 if p.resolve() != this and pattern.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert not offenders, f"these files cite shared/, GFM.md or STYLE.md: {offenders}"


def test_sentinel2_band_order_matches_ssl4eo():
    """The 12-band default statistics are SSL4EO-S12's L2A ones, whose band order puts B8A before B9
    (its ALL_BANDS_S2_L2A); the warning and the README must name that order."""
    from gfm_fast.models.normalization import default_normalization

    order = "B1-B8, B8A, B9, B11, B12"
    with pytest.warns(UserWarning) as caught:
        default_normalization(12)
    assert order in str(caught[0].message)
    assert order in " ".join(_text(ROOT / "README.md").split())
