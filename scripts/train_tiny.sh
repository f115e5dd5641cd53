#!/usr/bin/env bash
# Train the built-in small LaViDa from scratch on EntityGrid-QA with the project's own trainer, then its SHIRG
# LoRA stage, on this 2-core CPU (`make train-tiny`). Everything is seeded; outputs:
#   $MODEL_DIR            the LaViDa-style model (pooled any-res tokens, as the real checkpoint was trained)
#   $MODEL_DIR-shirg-lora the SHIRG LoRA adapter on top of it (load with --model-base $MODEL_DIR)
#
# Curriculum (why: a model this small trained from scratch learns answer priors long before it learns to look,
# unless the first images make looking easy; and the LM's attention over ~1,000 tokens is most of a step, so
# every step the vision tower does not have to run is a step more):
#   stage 0  the SigLIP tower alone (llava.train.pretrain_vision): 112² crops centred on one entity at sides
#            10-100 px, its colour / shape / label read by linear heads from the mean token -- the stand-in for the
#            SigLIP pretraining no one can download here. Measured: it learns colour and shape (val crop accuracy
#            in $OUT/stage0/val_accuracy.json) but not labels: reading a letter at any scale and sub-patch offset
#            is an invariance a 64-wide ViT from scratch does not learn in this budget
#   stage 1  "solo" EntityGrid images (ONE entity, 40-80% of the shorter side), one 384² view
#            (image_aspect_ratio pad: 729 unpooled tokens, like LaViDa's own first stage): the answer is in most
#            of the image's tokens
#   stage 2  "single" images (1-3 large entities), same view: binding a question to one entity of a few
#   stage 3  "grid" images (12-24 entities of all sizes) with LaViDa's any-res views pooled to ~1,000 tokens
#            (image_aspect_ratio anyres, --prune_method pool): the LaViDa-style baseline model
#   stage 4  "grid" images, --prune_method shirg, LoRA on SigLIP layers 0-3 q/k/v (+4-5 q/k where they exist)
#            and the projector from scripts/lora_shirg.yaml (rank 16 here: the small widths are 64), the rest
#            frozen: SHIRG's training stage
# Stages 1-3 train the projector and the LM; SigLIP stays as stage 0 left it, frozen, and its features are
# computed once per view and cached in RAM (--vision_feature_cache_gb; 5 any-res views x 729 x 64 fp32 = 0.9 MB
# per image). Measured: training SigLIP through the LM's answer loss instead made stage 1's loss worse (0.8-1.4
# vs 0.2-0.5 at the same steps) and costs ~40 % more per step. SHIRG's LoRA stage is the first to adapt SigLIP
# after stage 0.
# Every stage trains on prompts tokenised exactly as inference tokenises them (--inference_prompt True: LaViDa's
# inference drops the newline after <image>, its training keeps it; a model this small does not survive that
# one-token shift). Knobs: STEPS0..STEPS4 (optimizer steps per stage), BATCH, N_SOLO, N_SINGLE, N_GRID
# (training images), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/train-tiny}
MODEL_DIR=${MODEL_DIR:-playground/models/lavida-tiny}
STEPS0=${STEPS0:-1500}
STEPS1=${STEPS1:-300}
STEPS2=${STEPS2:-400}
STEPS3=${STEPS3:-1000}
STEPS4=${STEPS4:-120}
BATCH=${BATCH:-8}
N_SOLO=${N_SOLO:-2000}
N_SINGLE=${N_SINGLE:-3000}
N_GRID=${N_GRID:-2000}
SEED=${SEED:-0}
DIMS='"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 172, "init_fn": "fan_in"'

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
frozen_siglip=(--mm_tunable_parts mm_mlp_adapter,mm_language_model --vision_feature_cache_gb 8 --token_dropout 0)

log "stage 0: the SigLIP tower from scratch on entity crops, $STEPS0 steps"
[ -d "$OUT/stage0/final" ] || $PY -m llava.train.pretrain_vision --config_overrides "{$DIMS}" \
    --output_dir "$OUT/stage0" --max_steps "$STEPS0" --batch_size "$((BATCH * 16))" --learning_rate 1e-3 \
    --seed "$SEED"

log "stage 1: projector and LM from scratch, solo images, one 384² view, $STEPS1 steps"
$PY -m llava.train.train --model_name_or_path "$OUT/stage0/final" --config_overrides '{"image_aspect_ratio": "pad"}' \
    --data_path "$OUT/data/solo/train_llava.json" --image_folder "$OUT/data/solo" --output_dir "$OUT/stage1" \
    --prune_method lavida "${frozen_siglip[@]}" --max_steps "$STEPS1" --learning_rate 2e-3 --warmup_steps 30 \
    --min_lr_rate 0.3 "${common[@]}"

log "stage 2: single images (1-3 entities), one 384² view, $STEPS2 steps"
$PY -m llava.train.train --model_name_or_path "$OUT/stage1/final" \
    --data_path "$OUT/data/single/train_llava.json" --image_folder "$OUT/data/single" --output_dir "$OUT/stage2" \
    --prune_method lavida "${frozen_siglip[@]}" --max_steps "$STEPS2" --learning_rate 2e-3 --warmup_steps 20 \
    --min_lr_rate 0.3 --save_total_limit 1 "${common[@]}"

log "stage 3: grids, any-res views pooled (LaViDa-style), $STEPS3 steps"
$PY -m llava.train.train --model_name_or_path "$OUT/stage2/final" --config_overrides '{"image_aspect_ratio": "anyres"}' \
    --data_path "$OUT/data/grid/train_llava.json" --image_folder "$OUT/data/grid" --output_dir "$OUT/stage3" \
    --prune_method pool "${frozen_siglip[@]}" --max_steps "$STEPS3" --learning_rate 1.5e-3 --warmup_steps 20 \
    --min_lr_rate 0.1 --save_total_limit 1 "${common[@]}"

log "stage 4: SHIRG LoRA on grids, $STEPS4 steps"
$PY -m llava.train.train --model_name_or_path "$OUT/stage3/final" \
    --data_path "$OUT/data/grid/train_llava.json" --image_folder "$OUT/data/grid" --output_dir "$OUT/stage4" \
    --prune_method shirg --lora_enable True --lora_config scripts/lora_shirg.yaml --lora_r 16 --lora_alpha 32 \
    --max_steps "$STEPS4" --learning_rate 1e-3 --warmup_steps 10 --min_lr_rate 0.1 --save_total_limit 1 "${common[@]}"

log "copying the results to $MODEL_DIR and $MODEL_DIR-shirg-lora"
rm -rf "$MODEL_DIR.tmp" "$MODEL_DIR-shirg-lora.tmp"
mkdir -p "$(dirname "$MODEL_DIR")"
cp -r "$OUT/stage3/final" "$MODEL_DIR.tmp"
cp -r "$OUT/stage4/final" "$MODEL_DIR-shirg-lora.tmp"
rm -rf "$MODEL_DIR" "$MODEL_DIR-shirg-lora"
mv "$MODEL_DIR.tmp" "$MODEL_DIR"
mv "$MODEL_DIR-shirg-lora.tmp" "$MODEL_DIR-shirg-lora"
log "done"
