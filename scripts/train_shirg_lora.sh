#!/usr/bin/env bash
# SHIRG's LoRA stage: LoRA (scripts/lora_shirg.yaml: SigLIP layers 0-5 attention, projector) on a LaViDa
# checkpoint, trained with LaViDa's complementary-masking objective on SHIRG's 980 visual tokens.
#
#   bash scripts/train_shirg_lora.sh [extra llava.train.train flags, e.g. --max_steps 100]
#
# With CUDA: torchrun over every visible GPU + DeepSpeed (ZeRO-2 by default) + bf16 + gradient checkpointing on
# MODEL_PATH, upstream's launch shape:
#   MODEL_PATH=lavida-ckpts/lavida-llada-hd DATA_PATH=data/shirg.yaml IMAGE_FOLDER=data/images \
#       bash scripts/train_shirg_lora.sh
# Global batch 4/GPU x accumulation 4 x 8 GPUs = 128 samples (256 rows after complementary masking), lr 1.8e-5,
# 500 warm-up steps then cosine, weight decay 1e-4, token dropout 0.1; resumes from the latest checkpoint.
#
# Without CUDA: the same entry and engine in ONE process on gloo, fp32, on the built-in small model and the
# bundled data (playground/data), for MAX_STEPS (default 8) steps at a higher lr; then the adapter is loaded
# with `llava.eval.run --model-path ADAPTER --model-base BASE`.
#
# Overrides (environment): MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR DEEPSPEED (empty: plain torch DDP)
# NGPU MAX_STEPS MASTER_PORT PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
NGPU="${NGPU:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}"
PORT="${MASTER_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
DEEPSPEED="${DEEPSPEED-scripts/zero2.json}"

if [ "$NGPU" -gt 0 ]; then
    MODEL_PATH="${MODEL_PATH:-lavida-ckpts/lavida-llada-hd}"
    DATA_PATH="${DATA_PATH:?set DATA_PATH to the training data (LLaVA .json/.jsonl or a .yaml data list)}"
    IMAGE_FOLDER="${IMAGE_FOLDER:-}"
    OUTPUT_DIR="${OUTPUT_DIR:-outputs/shirg_lora}"
    NPROC="$NGPU"
    MODE=(--bf16 True --gradient_checkpointing True --per_device_train_batch_size 4
          --gradient_accumulation_steps 4 --learning_rate 1.8e-5 --warmup_steps 500 --num_train_epochs 1
          --save_steps 250 --save_total_limit 2 --dataloader_num_workers 4 --resume_from_checkpoint latest)
else
    MODEL_PATH="${MODEL_PATH:-builtin:lavida-small}"
    DATA_PATH="${DATA_PATH:-playground/data/train.json}"
    IMAGE_FOLDER="${IMAGE_FOLDER:-playground/data}"
    OUTPUT_DIR="${OUTPUT_DIR:-outputs/shirg_lora_cpu}"
    NPROC=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
    MODE=(--per_device_train_batch_size 2 --gradient_accumulation_steps 1 --learning_rate 1e-3 --warmup_steps 2
          --max_steps "${MAX_STEPS:-8}" --save_steps 4 --overwrite_output_dir True)
    echo "no CUDA device: one CPU process (gloo, fp32) on $MODEL_PATH with $DATA_PATH" >&2
fi

ENGINE=()
[ -n "$DEEPSPEED" ] && ENGINE=(--deepspeed "$DEEPSPEED")
FOLDER=()
[ -n "$IMAGE_FOLDER" ] && FOLDER=(--image_folder "$IMAGE_FOLDER")

start=$(date +%s)
"$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "$PORT" -m llava.train.train_mem \
    --model_name_or_path "$MODEL_PATH" --data_path "$DATA_PATH" "${FOLDER[@]}" --output_dir "$OUTPUT_DIR" \
    --prune_method shirg --lora_enable True --lora_config scripts/lora_shirg.yaml --token_dropout 0.1 \
    --weight_decay 1e-4 --model_max_length 4096 --logging_steps 1 "${ENGINE[@]}" "${MODE[@]}" "$@"
echo "trained in $(( $(date +%s) - start )) s; adapter: $OUTPUT_DIR/final" >&2

if [ "$NGPU" -eq 0 ]; then
    "$PY" -m llava.eval.run --model-path "$OUTPUT_DIR/final" --model-base "$MODEL_PATH" --prune_method shirg \
        --question "What shape is labelled U?"
fi
