"""The training script: ``deepspeed gfm_fast/train.py ...`` or ``python gfm_fast/train.py ...``.

A thin entry point over ``gfm_fast.training`` (see its docstring and ``--help``); from Python
use ``gfm_fast.train(config, **overrides)``.
"""
import os
import sys

if __name__ == "__main__":
    # Run as a file: do not let gfm_fast/'s own modules (data, models, ...) shadow top-level imports.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    from gfm_fast.training import main

    sys.exit(main())
