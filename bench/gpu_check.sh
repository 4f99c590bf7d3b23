#!/usr/bin/env bash
# Issue 6's GPU checks as one prepared run on a lent device machine: the CUDA-graph tests (greedy tokens
# equal eager decoding for Llama, Mistral, Mixtral, CALM and CogVLM, and the scaled rope types), bench/decode.py (>= 1B SOLAR Llama,
# 8-expert MoE, CALM: eager and CUDA-graph ms/token against the bandwidth floor) and bench/moe_layer.py
# (generated MoE layer vs transformers' at Mixtral width). About 5 minutes on an H200.
#
# The device image has torch, transformers, jinja2, networkx and onnx, but not pydantic. Carry its wheels
# (once, here, in the repository root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# then run it with the device tool: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 540.
# Logs land in $OUT (gpu.txt, tests.txt, decode.txt, moe_layer.txt).
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
site=/tmp/site
rm -rf "$site/compose" && mkdir -p "$site"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
# The package laid out as pyproject's package-dir maps it (no pip build: the image's setuptools may be old).
cp -r compose "$site/compose" && for d in families lower ir passes backends codegen merges; do cp -r "$d" "$site/compose/$d"; done
export PYTHONPATH=$site  # and python3 -P below: the repository's own compose/ (without ir/ etc.) must not shadow it
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/gpu.txt"
timeout 150 python3 -P -m pytest -q -p no:cacheprovider tests/test_runtime.py tests/test_rope.py::test_cuda_graph_decoding_equals_eager -rs 2>&1 | tee "$out/tests.txt"
timeout 200 python3 -P bench/decode.py --device cuda 2>&1 | tee "$out/decode.txt"
timeout 120 python3 -P bench/moe_layer.py --device cuda --sizes mixtral 2>&1 | tee "$out/moe_layer.txt"
