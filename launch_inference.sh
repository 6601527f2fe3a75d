#!/usr/bin/env bash
# Run PaliGemma on one image. Every setting can be overridden from the environment, e.g.
#   MODEL_PATH=~/models/paligemma-3b-mix-224 PROMPT="answer en what is the cat doing?" bash launch_inference.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

MODEL_PATH="${MODEL_PATH:-$HOME/paligemma-weights/paligemma-3b-pt-224}"
PROMPT="${PROMPT:-caption en}"
IMAGE_FILE_PATH="${IMAGE_FILE_PATH:-$HERE/test_images/cat.jpg}"
MAX_TOKENS_TO_GENERATE="${MAX_TOKENS_TO_GENERATE:-100}"
TEMPERATURE="${TEMPERATURE:-0.8}"
TOP_P="${TOP_P:-0.9}"
DO_SAMPLE="${DO_SAMPLE:-False}"
ONLY_CPU="${ONLY_CPU:-False}"
OUTPUT_FORMAT="${OUTPUT_FORMAT:-text}"
PYTHON="${PYTHON:-python}"

if [[ ! -d "$MODEL_PATH" ]]; then
    cat >&2 <<MSG
error: MODEL_PATH=$MODEL_PATH does not exist.
PaliGemma's weights are gated: accept Google's licence on the model's page (for example
https://huggingface.co/google/paligemma-3b-pt-224), then download the folder, for example with
    huggingface-cli login && huggingface-cli download google/paligemma-3b-pt-224 --local-dir "$MODEL_PATH"
and run again, or point MODEL_PATH at a folder you already have.
MSG
    exit 1
fi

# --dtype, --quantize and --seed only when DTYPE, QUANTIZE and SEED are set: by default the checkpoint's own half
# precision, and an unseeded sample.
exec "$PYTHON" "$HERE/inference.py" ${DTYPE:+--dtype "$DTYPE"} ${QUANTIZE:+--quantize "$QUANTIZE"} ${SEED:+--seed "$SEED"} \
    --model_path "$MODEL_PATH" \
    --prompt "$PROMPT" \
    --image_file_path "$IMAGE_FILE_PATH" \
    --max_tokens_to_generate "$MAX_TOKENS_TO_GENERATE" \
    --temperature "$TEMPERATURE" \
    --top_p "$TOP_P" \
    --do_sample "$DO_SAMPLE" \
    --only_cpu "$ONLY_CPU" \
    --output_format "$OUTPUT_FORMAT"
