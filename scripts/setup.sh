#!/usr/bin/env bash
# Create .venv with Python 3.12 and install puzzlemoe-jax (editable) pinned to jax 0.11.2, the
# version on the GPU machine.  `bash scripts/setup.sh test` adds the test extras (pytest,
# hypothesis, transformers, torch 2.13.0).  Re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for cand in python3.12 "$(command -v pyenv >/dev/null && pyenv root)/versions/"3.12*/bin/python3.12 \
              /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$cand"; return 0
    fi
  done
  echo "scripts/setup.sh: Python 3.12 not found (install it, e.g. with pyenv)" >&2
  return 1
}
if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" -c constraints.txt
