"""Lazy package attributes (PEP 562): a name is imported from its module on first use, so that
importing a package stays light (no torch, timm or Triton until something needs them)."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Dict, Iterable, List, Tuple


def lazy_attributes(package: str, table: Dict[str, str],
                    extra: Iterable[str] = ()) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``table`` maps each public name to the module
    that defines it, or that is it (``"ops": "gfm_fast.ops"``). A resolved name is cached in the
    package's namespace, so the lookup runs once."""
    names = sorted(table) + list(extra)

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        imported = importlib.import_module(module)
        value = imported if module.endswith("." + name) else getattr(imported, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> List[str]:
        return names

    return __getattr__, __dir__
