#!/usr/bin/env bash
# Train the built-in small LaViDa from scratch on EntityGrid-QA with the project's own trainer, then its SHIRG
# LoRA stage, on this 2-core CPU (`make train-tiny`). Everything is seeded; outputs:
#   $MODEL_DIR            the LaViDa-style model (pooled any-res tokens, as the real checkpoint was trained)
#   $MODEL_DIR-shirg-lora the SHIRG LoRA adapter on top of it (load with --model-base $MODEL_DIR)
#
# Curriculum (why: a model this small trained from scratch learns answer priors long before it learns to look,
# unless the first images make looking easy; and every any-res sample costs ~4x a single-view one on this CPU,
# so the cheap single-view stages teach SigLIP and the any-res stage trains the projector and LM on cached
# features of the frozen SigLIP):
#   stage 1  "solo" EntityGrid images (ONE entity, 40-80% of the shorter side), one 384² view
#            (image_aspect_ratio pad: 729 unpooled tokens, like LaViDa's own first stage), every part trained
#            from scratch: the answer is in most of the image's tokens
#   stage 2  "single" images (1-3 large entities), same view: binding a question to one entity of a few
#   stage 3  "grid" images (12-24 entities of all sizes), same single view: finding one entity among many
#   stage 4  "grid" images with LaViDa's any-res views pooled to ~1,000 tokens (image_aspect_ratio anyres,
#            --prune_method pool), projector + LM trained on the stage-3 SigLIP, frozen, whose features are
#            computed once per view and cached in RAM (--vision_feature_cache_gb: 5 views x 729 x 64 fp32 =
#            0.9 MB per image): the LaViDa-style baseline model
#   stage 5  "grid" images, --prune_method shirg, LoRA on SigLIP layers 0-3 q/k/v (+4-5 q/k where they exist)
#            and the projector from scripts/lora_shirg.yaml (rank 16 here: the small widths are 64), the rest
#            frozen: SHIRG's training stage
# Every stage trains on prompts tokenised exactly as inference tokenises them (--inference_prompt True: LaViDa's
# inference drops the newline after <image>, its training keeps it; a model this small does not survive that
# one-token shift). Knobs: STEPS1..STEPS5 (optimizer steps per stage), BATCH, N_SOLO, N_SINGLE, N_GRID
# (training images), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/train-tiny}
MODEL_DIR=${MODEL_DIR:-playground/models/lavida-tiny}
STEPS1=${STEPS1:-300}
STEPS2=${STEPS2:-300}
STEPS3=${STEPS3:-250}
STEPS4=${STEPS4:-450}
STEPS5=${STEPS5:-150}
BATCH=${BATCH:-8}
N_SOLO=${N_SOLO:-2000}
N_SINGLE=${N_SINGLE:-3000}
N_GRID=${N_GRID:-1500}
SEED=${SEED:-0}
DIMS='"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 172'

mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[train-tiny $(( $(date +%s) - start ))s] $*"; }

log "data: $N_SOLO solo + $N_SINGLE single + $N_GRID grid EntityGrid training images (split train, seed $SEED)"
for kind in solo single grid; do
    n_var="N_${kind^^}"
    [ -f "$OUT/data/$kind/train_llava.json" ] || \
        $PY -m llava.eval.entitygrid --split train --kind "$kind" --n "${!n_var}" --seed "$SEED" --out "$OUT/data/$kind" --llava
done

# --extra_pad_max 16: LaViDa appends up to 128 extra EOS targets to a batch; with one-word answers those would be
# ~95 % of the token-mean loss, so the answer's signal is diluted ~20x. 16 keeps some answer-length variety.
common=(--per_device_train_batch_size "$BATCH" --seed "$SEED" --save_steps 50 --weight_decay 1e-4
        --logging_steps 10 --extra_pad_max 16 --inference_prompt True --resume_from_checkpoint latest)
single_view=(--prune_method lavida --token_dropout 0)

log "stage 1: from scratch, solo images, one 384² view, $STEPS1 steps"
$PY -m llava.train.train --model_name_or_path builtin:lavida-small \
    --config_overrides "{$DIMS, \"image_aspect_ratio\": \"pad\"}" \
    --data_path "$OUT/data/solo/train_llava.json" --image_folder "$OUT/data/solo" --output_dir "$OUT/stage1" \
    "${single_view[@]}" --max_steps "$STEPS1" --learning_rate 2e-3 --warmup_steps 30 "${common[@]}"

log "stage 2: single images (1-3 entities), one 384² view, $STEPS2 steps"
$PY -m llava.train.train --model_name_or_path "$OUT/stage1/final" \
    --data_path "$OUT/data/single/train_llava.json" --image_folder "$OUT/data/single" --output_dir "$OUT/stage2" \
    "${single_view[@]}" --max_steps "$STEPS2" --learning_rate 2e-3 --warmup_steps 20 --min_lr_rate 0.1 \
    --save_total_limit 1 "${common[@]}"

log "stage 3: grids, one 384² view, $STEPS3 steps"
$PY -m llava.train.train --model_name_or_path "$OUT/stage2/final" \
    --data_path "$OUT/data/grid/train_llava.json" --image_folder "$OUT/data/grid" --output_dir "$OUT/stage3" \
    "${single_view[@]}" --max_steps "$STEPS3" --learning_rate 1.5e-3 --warmup_steps 20 --min_lr_rate 0.1 \
    --save_total_limit 1 "${common[@]}"

log "stage 4: grids, any-res views pooled (LaViDa-style), projector + LM on cached SigLIP features, $STEPS4 steps"
$PY -m llava.train.train --model_name_or_path "$OUT/stage3/final" --config_overrides '{"image_aspect_ratio": "anyres"}' \
    --mm_tunable_parts mm_mlp_adapter,mm_language_model --vision_feature_cache_gb 8 \
    --data_path "$OUT/data/grid/train_llava.json" --image_folder "$OUT/data/grid" --output_dir "$OUT/stage4" \
    --prune_method pool --token_dropout 0 --max_steps "$STEPS4" --learning_rate 1e-3 --warmup_steps 20 \
    --min_lr_rate 0.1 --save_total_limit 1 "${common[@]}"

log "stage 5: SHIRG LoRA on grids, $STEPS5 steps"
$PY -m llava.train.train --model_name_or_path "$OUT/stage4/final" \
    --data_path "$OUT/data/grid/train_llava.json" --image_folder "$OUT/data/grid" --output_dir "$OUT/stage5" \
    --prune_method shirg --lora_enable True --lora_config scripts/lora_shirg.yaml --lora_r 16 --lora_alpha 32 \
    --max_steps "$STEPS5" --learning_rate 1e-3 --warmup_steps 10 --min_lr_rate 0.1 --save_total_limit 1 "${common[@]}"

log "copying the results to $MODEL_DIR and $MODEL_DIR-shirg-lora"
rm -rf "$MODEL_DIR.tmp" "$MODEL_DIR-shirg-lora.tmp"
mkdir -p "$(dirname "$MODEL_DIR")"
cp -r "$OUT/stage4/final" "$MODEL_DIR.tmp"
cp -r "$OUT/stage5/final" "$MODEL_DIR-shirg-lora.tmp"
rm -rf "$MODEL_DIR" "$MODEL_DIR-shirg-lora"
mv "$MODEL_DIR.tmp" "$MODEL_DIR"
mv "$MODEL_DIR-shirg-lora.tmp" "$MODEL_DIR-shirg-lora"
log "done"
