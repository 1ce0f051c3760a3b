#!/usr/bin/env bash
# Creates ./.venv with Python 3.12 and installs requirements.txt plus this package (editable).
# Safe to re-run: it reinstalls only when requirements.txt or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

find_python() {
    local candidates=(python3.12)
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=("$(pyenv root)"/versions/3.12.*/bin/python)
    fi
    candidates+=("$HOME"/.pyenv/versions/3.12.*/bin/python /usr/bin/python3.12 /usr/local/bin/python3.12 python3)
    for py in "${candidates[@]}"; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    return 1
}

stamp=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -x .venv/bin/python && -f .venv/.tnl-stamp && "$(cat .venv/.tnl-stamp)" == "$stamp" ]]; then
    exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
    if ! py=$(find_python); then
        echo "setup.sh: Python 3.12 not found (looked for python3.12 on PATH and under pyenv)." >&2
        echo "megatron-core >= 0.17 needs Python 3.12: install it (e.g. 'pyenv install 3.12') and re-run." >&2
        exit 1
    fi
    echo "setup.sh: creating .venv with $py"
    "$py" -m venv .venv
fi
echo "setup.sh: installing requirements (torch's CUDA build is several GB; it also runs on a CPU)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "$stamp" > .venv/.tnl-stamp
echo "setup.sh: done"
