"""Is this model any good? k-NN and linear-probe scene classification on frozen GFM features.

``python -m gfm_fast.eval --model MODEL --data DIR`` (see ``__main__``) and :func:`evaluate` score
one or more models beside a random-init baseline (and optionally the teacher's own features);
:func:`knn_accuracy` gives the k-NN top-1 alone, for logging during training.

Modules: ``datasets`` (class folders, split files, shards), ``models`` (the models and baselines),
``extraction`` (resize, normalise, ``extract_features``), ``cache`` (features on disk),
``protocols`` (k-NN, linear probe, stratified splits, metrics), ``report`` (JSON, table, Markdown,
confusion PNGs), ``runner`` (``evaluate``, ``knn_accuracy``).
"""
from gfm_fast.eval.datasets import EvalError, LabelledImages, open_dataset
from gfm_fast.eval.report import EvalReport, FoldResult, ModelResult, ProtocolResult
from gfm_fast.eval.runner import evaluate, knn_accuracy

__all__ = ["evaluate", "knn_accuracy", "open_dataset", "EvalError", "EvalReport", "ModelResult", "ProtocolResult",
           "FoldResult", "LabelledImages"]
