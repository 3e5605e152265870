#!/usr/bin/env bash
# Build the isolated LLaMA-Factory 0.9.5 virtualenv used by bench/sft_throughput.py.
#
#   bash bench/setup_llamafactory.sh            # creates .bench/llamafactory-venv (git-ignored)
#   VENV=/some/where bash bench/setup_llamafactory.sh
#
# Why this is not a plain `pip install llamafactory`:
#   1. pip would swap our CPU torch 2.13.0 for a multi-GB CUDA build, so torch is installed
#      first and then pinned with a constraints file (`-c`).
#   2. LLaMA-Factory depends on torchaudio and torchvision; PyPI's wheels of both are CUDA builds
#      that cannot load next to the CPU torch (torchvision fails with "operator torchvision::nms
#      does not exist" as soon as transformers imports it). LLaMA-Factory imports torchvision
#      nowhere itself, so we uninstall it (transformers then treats it as absent). But
#      llamafactory/data/mm_plugin.py imports torchaudio unconditionally (only used for audio
#      inputs, which a text-only SFT never touches), so after uninstalling the real wheel we put
#      a tiny stub package named `torchaudio` into THIS venv only (never into the project's
#      .venv). The stub has no dist-info (so transformers' availability checks say "absent"),
#      imports fine, and raises a clear error if anything actually uses it.
#      `pip check` therefore reports torchaudio/torchvision as missing: expected.
# Idempotent: re-running reuses the venv and only re-checks the pins and the stub.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.bench/llamafactory-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
LLAMAFACTORY_VERSION="0.9.5"

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip

# 1. torch first (a CPU wheel lies in the local wheelhouse; pip takes it in seconds).
"${PIP[@]}" install "torch==${TORCH_VERSION}"

# 2. LLaMA-Factory with torch pinned, so the resolver cannot replace it with a CUDA build.
CONSTRAINTS="$VENV/bench-constraints.txt"
cat > "$CONSTRAINTS" <<CONS
torch==${TORCH_VERSION}
CONS
if "$VENV/bin/python" -m pip show llamafactory 2>/dev/null | grep -qx "Version: ${LLAMAFACTORY_VERSION}"; then
  echo "llamafactory ${LLAMAFACTORY_VERSION} already installed"
else
  "${PIP[@]}" install "llamafactory==${LLAMAFACTORY_VERSION}" -c "$CONSTRAINTS"
fi

# 3. Drop the CUDA torchaudio/torchvision wheels and add the torchaudio stub (see 2. above).
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for pkg in torchaudio torchvision; do
  if "$VENV/bin/python" -m pip show "$pkg" >/dev/null 2>&1; then
    echo "removing the PyPI $pkg wheel (CUDA build, cannot load next to CPU torch)"
    "${PIP[@]}" uninstall -y "$pkg"
  fi
done
mkdir -p "$SITE/torchaudio"
cat > "$SITE/torchaudio/__init__.py" <<'STUB'
"""Stub torchaudio, installed by tuneline's bench/setup_llamafactory.sh.

LLaMA-Factory 0.9.5 imports torchaudio at module level in llamafactory/data/mm_plugin.py,
but only uses it for audio inputs. PyPI's torchaudio is a CUDA build that cannot load on
a CPU-only machine, so this stub lets the import succeed and fails loudly on any real use.
"""

__version__ = "0.0.0+tuneline.stub"
TUNELINE_STUB = True


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"torchaudio.{name}: this venv has a stub torchaudio (text-only benchmark); "
        "audio features are unavailable"
    )
STUB

# 4. Smoke check: the CLI imports and torch is still the CPU build.
"$VENV/bin/python" - <<'PY'
import torch, torchaudio, transformers, peft
import llamafactory
from llamafactory.data import mm_plugin  # the module that imports torchaudio
assert "+cpu" in torch.__version__, torch.__version__
assert getattr(torchaudio, "TUNELINE_STUB", False)
print(f"ok: llamafactory {llamafactory.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, torchaudio stub")
PY
"$VENV/bin/python" -m pip check || echo "note: pip check names torchaudio/torchvision as missing: expected, see bench/README.md"
echo "LLaMA-Factory venv ready: $VENV"
