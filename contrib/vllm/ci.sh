#!/usr/bin/env bash
# Prepare the vLLM end-to-end tier before the test run (CI or a fresh machine):
# build the cached vLLM virtualenv and the tiny model, and print what they cost.
# The tier's fixture does the same on demand; running this first keeps the
# minutes of a first install out of any test's timeout and makes a broken
# install fail here, with pip's output, instead of inside pytest.
#
#   contrib/vllm/ci.sh && scripts/test            # whole suite, vLLM tier included
#   scripts/test -m vllm                          # only the tier
#   scripts/test -m "not vllm"                    # everything else
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
py=$(bash contrib/vllm/setup_env.sh)
echo "vllm env: $py ($(( $(date +%s) - start ))s)"
model=$("$py" contrib/vllm/build_tiny_model.py "${SLUICE_VLLM_HOME:-$HOME/.cache/sluice-vllm}/models/tiny-llama-s0")
echo "tiny model: $model ($(( $(date +%s) - start ))s)"
"$py" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null
