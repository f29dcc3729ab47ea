#!/usr/bin/env bash
# Create .venv (if missing), install the pinned dependencies and build gfm_fast (C++ ops; CUDA ops
# too where a CUDA toolkit exists). Re-running is quick: when requirements, setup.py, csrc/ and the
# extras asked for are unchanged since the last successful install, nothing is reinstalled or
# recompiled.
#
# GFM_EXTRAS: optional extras of setup.py, comma-separated, e.g. GFM_EXTRAS=terratorch,export
# (installed under requirements.txt as constraints, so they never move torch, timm or numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=$(echo "${GFM_EXTRAS:-}" | tr -d ' ')
known=$(sed -n '/extras_require=/,/}/p' setup.py | grep -o '"[a-z0-9_-]*": \[' | tr -d '":[ ' | paste -sd, -)
for extra in ${extras//,/ }; do  # pip would only warn about a misspelt extra, and install nothing for it
    case ",$known," in
        *",$extra,"*) ;;
        *) echo "install.sh: unknown extra '$extra' in GFM_EXTRAS (setup.py has: $known)" >&2; exit 2 ;;
    esac
done
version_ok='import sys; sys.exit(sys.version_info < (3, 10))'  # torch 2.14 has no wheels for older Pythons
if ! { [ -x .venv/bin/python ] && [ -f .venv/bin/activate ] && .venv/bin/python -c "$version_ok" \
       && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
    # no .venv yet, or one left unusable by an earlier failed try (no pip, no activate, an old Python)
    if ! "$PYTHON" -c "$version_ok" 2>/dev/null; then
        echo "install.sh: needs Python 3.10 or newer; $PYTHON is $("$PYTHON" --version 2>/dev/null || echo "not found")." \
             "Set PYTHON, e.g. PYTHON=python3.11 bash scripts/install.sh" >&2
        exit 2
    fi
    "$PYTHON" -m venv --clear .venv || { echo "install.sh: '$PYTHON -m venv' failed (Debian/Ubuntu: apt install" \
        "python3-venv, or the python3.X-venv of your version)" >&2; exit 2; }
fi
. .venv/bin/activate
stamp=.venv/.gfm_fast_install
digest=$( (echo "extras=$extras"; cat requirements.txt setup.py $(find csrc -type f | sort)) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && python -c "import torch, gfm_fast._C" 2>/dev/null; then
    echo "gfm_fast: already installed and built (delete $stamp to force a rebuild)"
else
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q -r requirements.txt
    # deepspeed and our extension compile against the torch installed above, not a fresh isolated copy.
    python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
    python -m pip install -q --no-build-isolation -c requirements.txt -e ".[test${extras:+,$extras}]"
    echo "$digest" > "$stamp"
fi
python -c "import gfm_fast, gfm_fast.ops as o; print('gfm_fast', gfm_fast.__version__, 'backends', o.available_backends())"
