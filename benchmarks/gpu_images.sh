#!/usr/bin/env bash
# benchmarks/images.py on one GPU with a FLUX.1 [schnell]-shaped pipeline (random weights at
# the real sizes, benchmarks/flux_shaped.py): 1024x1024, 4 steps, guidance 0, 256 T5 tokens,
# bf16, HTTP against in-process, then streamed previews (image_previews.py), in about 8
# minutes. For a GPU node that reaches no hub; with the real weights at hand, run images.py
# with --model black-forest-labs/FLUX.1-schnell.
#
# The node has torch, transformers, accelerate, aiohttp, httpx, msgpack, Pillow and
# prometheus-client; what else `pagoda serve` and images.py import travels as wheels for
# Python 3.12 in .whl/ (kept out of git), fetched once on the dev machine:
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       $(cat benchmarks/gpu_images_wheels.txt)
#
# Results (images_flux_schnell_shaped_gpu_1024.json, image_previews_..., logs) go to "${OUT:-/tmp/gpu-images}".
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-images}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"

# the weights in RAM where the machine lets them (34 GB), else on disk
folder=/tmp/flux-schnell-shaped
shm_free=$(df --output=avail -B1G /dev/shm 2> /dev/null | tail -1 | tr -d ' ')
[ "${shm_free:-0}" -gt 45 ] && folder=/dev/shm/flux-schnell-shaped
df -h "$(dirname "$folder")" | tail -1
DEVICE="${DEVICE:-cuda}"
# shellcheck disable=SC2086  # FLUX_SHAPED_ARGS: e.g. "--layers 1 --t5-layers 1" for a dry run
timeout 200 python3 benchmarks/flux_shaped.py "$folder" --device "$DEVICE" ${FLUX_SHAPED_ARGS:-} 2>&1 |
    grep -v -e Warning -e 'Writing model shards' | tee "$OUT/build.log" || exit 1

timeout "${IMAGES_TIMEOUT_S:-330}" python3 benchmarks/images.py --model "$folder" --device "$DEVICE" \
    --dtype bfloat16 --size "${IMAGES_SIZE:-1024x1024}" --steps 4 --guidance 0 --max-sequence-length 256 \
    --num-images "${IMAGES_PER_PART:-8}" --rounds "${IMAGES_ROUNDS:-2}" \
    --result-json "$OUT/images_flux_schnell_shaped_gpu_1024.json" 2>&1 |
    grep -v -e Warning -e 'Loading' | tee "$OUT/images.log"
status=$?
# streamed previews at schnell's 4 steps: 3 previews, one after each of the first 3 steps
timeout "${PREVIEWS_TIMEOUT_S:-150}" python3 benchmarks/image_previews.py --model "$folder" \
    --device "$DEVICE" --dtype bfloat16 --size "${IMAGES_SIZE:-1024x1024}" --steps 4 --guidance 0 \
    --max-sequence-length 256 --blocks "${PREVIEWS_BLOCKS:-3}" \
    --result-json "$OUT/image_previews_flux_schnell_shaped_gpu_1024.json" 2>&1 |
    grep -v -e Warning -e 'Loading' | tee "$OUT/image_previews.log"
rm -rf "$folder"
exit $status
