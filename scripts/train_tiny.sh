#!/usr/bin/env bash
# Train the built-in small LaViDa from scratch on EntityGrid-QA with the project's own trainer, then its SHIRG
# LoRA stage, on this 2-core CPU (`make train-tiny`). Everything is seeded; outputs:
#   $MODEL_DIR            the LaViDa-style model (pooled any-res tokens, as the real checkpoint was trained)
#   $MODEL_DIR-shirg-lora the SHIRG LoRA adapter on top of it (load with --model-base $MODEL_DIR)
#
# Curriculum. Why it looks like this (each point measured with probes on held-out images, README "Training the
# built-in model"): a model this small trained from scratch learns answer priors long before it learns to look;
# naming what is in the image (one hop: answer <- image) is learned in ~100 steps, but every EntityGrid question
# about a grid names an entity in words and needs the words MATCHED against the image (answer <- question word x
# image), and that is learned only after a plateau of thousands of matching questions, per colour and shape. So
# the matching is taught first where it is easiest, with the answers balanced so the prior cannot hide it:
#   stage 0  the SigLIP tower alone (llava.train.pretrain_vision): 112² crops centred on one entity at sides
#            10-100 px, its colour / shape / label read by linear heads from the mean token, and per token its
#            (x, y) and whether an entity's centre is in its patch (so tokens keep where they are) -- the stand-in for the
#            SigLIP pretraining no one can download here; per token also the colour and shape of the entity
#            whose centre is in its patch (an oracle LM counts on grids only when every entity, however small, is
#            in its centre token). It learns colour and shape, not labels (val crop
#            accuracy in $OUT/stage0/val_accuracy.json): reading a letter at any scale and sub-patch offset is an
#            invariance a 64-wide ViT from scratch does not learn in this budget, so stages 2-3 do not train on
#            questions that need a label read (label, colour-of-label, shape-of-label); stage 1 keeps them (one
#            entity makes the label irrelevant), the grid stages 5-6 keep all five
#   stage 1  "solo" images (ONE entity, 40-80% of the shorter side): name its colour and shape, and count
#            questions whose colour/shape is in the image half the time (--balanced-counts; drawn uniformly it
#            would be 0 for 7/8 of colour counts, and "always 0" is what the model then learns)
#   stage 2  the same images, count questions only, at half the learning rate: the matching stage (at 2e-3
#            the counts stayed one constant answer through 750 steps, at 6e-3 too; at 1e-3 they start to follow
#            the image within 200)
#   stage 3  "single" images (1-3 large entities): counts and left/right/above/below of two named entities
#   stages 1-3 see ONE 384² view pooled to 14x14 = 196 tokens (image_aspect_ratio pad + this project's config
#            key mm_2d_pool true): a quarter of the LM's sequence of the unpooled view, enough for entities this
#            large
#   stage 4  "grid" images (12-24 entities of all sizes), count questions only, LaViDa's any-res views pooled
#            to ~1,000 tokens (image_aspect_ratio anyres, --prune_method pool): the matching stage again, where
#            entities are small and many (an oracle LM with every entity in its tokens needed ~800 grid count
#            steps to leave the prior; the earlier recipe, which went straight to the mixed stage 5, left grid
#            counts at their prior)
#   stage 5  the same grids, all five question types (counts and positions twice
#            as often; the label types then at least score their prior), the same pooled any-res views: the
#            LaViDa-style baseline model
#   stage 6  the same grids, --prune_method shirg, LoRA on SigLIP layers 0-3 q/k/v (+4-5 q/k where they exist)
#            and the projector from scripts/lora_shirg.yaml (rank 16 here: the small widths are 64), the rest
#            frozen: SHIRG's training stage
# Stages 1-5 train the projector and the LM; SigLIP stays as stage 0 left it, frozen, and its features are
# computed once per view and cached in RAM (--vision_feature_cache_gb; 5 any-res views x 729 x 64 fp32 = 0.9 MB
# per image). Training SigLIP through the LM's answer loss instead made the first LM stage's loss worse and costs
# ~40 % more per step. SHIRG's LoRA stage is the first to adapt SigLIP after stage 0.
# Every stage trains on prompts tokenised exactly as inference tokenises them (--inference_prompt True: LaViDa's
# inference drops the newline after <image>, its training keeps it; a model this small does not survive that
# one-token shift). Knobs: STEPS0..STEPS6 (optimizer steps per stage), BATCH (stages 1-3; stages 4-6 use half),
# N_SOLO, N_SINGLE, N_GRID (training images), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/train-tiny}
MODEL_DIR=${MODEL_DIR:-playground/models/lavida-tiny}
STEPS0=${STEPS0:-1500}
STEPS1=${STEPS1:-1000}
STEPS2=${STEPS2:-800}
STEPS3=${STEPS3:-1200}
STEPS4=${STEPS4:-800}
STEPS5=${STEPS5:-800}
STEPS6=${STEPS6:-120}
BATCH=${BATCH:-16}
N_SOLO=${N_SOLO:-2000}
N_SINGLE=${N_SINGLE:-3000}
N_GRID=${N_GRID:-2000}
SEED=${SEED:-0}
DIMS='"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 172, "init_fn": "fan_in"'

mkdir -p "$OUT"
start=$(date +%s)
log() { echo "[train-tiny $(( $(date +%s) - start ))s] $*"; }

# data NAME KIND N QUESTIONS_PER_IMAGE QTYPES: one training set (skipped when already written)
data() {
    [ -f "$OUT/data/$1/train_llava.json" ] || $PY -m llava.eval.entitygrid --split train --kind "$2" --n "$3" \
        --seed "$SEED" --out "$OUT/data/$1" --llava --balanced-counts --questions-per-image "$4" --qtypes "$5"
}
log "data: $N_SOLO solo, $N_SINGLE single, $N_GRID grid EntityGrid training images (split train, seed $SEED)"
data solo solo "$N_SOLO" 4 colour,shape,count
data solo-count solo "$N_SOLO" 2 count
data single-cp single "$N_SINGLE" 4 count,position
data grid-count grid "$N_GRID" 4 count
data grid-all grid "$N_GRID" 4 label,colour,shape,count,count,position,position

# --extra_pad_max 16: LaViDa appends up to 128 extra EOS targets to a batch; with one-word answers those would be
# ~95 % of the token-mean loss, so the answer's signal is diluted ~20x. 16 keeps some answer-length variety.
common=(--seed "$SEED" --save_steps 250 --weight_decay 1e-4 --logging_steps 10 --extra_pad_max 16
        --inference_prompt True --resume_from_checkpoint latest --save_total_limit 1)
frozen_siglip=(--mm_tunable_parts mm_mlp_adapter,mm_language_model --vision_feature_cache_gb 8 --token_dropout 0)
one_view='{"image_aspect_ratio": "pad", "mm_2d_pool": true}'

# stage N FROM DATA STEPS LR MIN_LR_RATE BATCH ARGS...: one LaViDa training stage on $OUT/data/DATA. A finished
# stage is skipped and a killed one resumes from its last checkpoint, so rerunning the script continues a run.
stage() {
    local n=$1 from=$2 set=$3 steps=$4 lr=$5 min_lr=$6 batch=$7
    shift 7
    if [ -d "$OUT/stage$n/final" ]; then log "stage $n is done ($OUT/stage$n/final; delete it to redo)"; return; fi
    $PY -m llava.train.train --model_name_or_path "$from" --data_path "$OUT/data/$set/train_llava.json" \
        --image_folder "$OUT/data/$set" --output_dir "$OUT/stage$n" --max_steps "$steps" --learning_rate "$lr" \
        --warmup_steps 30 --min_lr_rate "$min_lr" --per_device_train_batch_size "$batch" "${common[@]}" "$@"
}

log "stage 0: the SigLIP tower from scratch on entity crops, $STEPS0 steps"
if [ -d "$OUT/stage0/final" ]; then
    log "stage 0 is done ($OUT/stage0/final; delete it to redo)"
else
    $PY -m llava.train.pretrain_vision --config_overrides "{$DIMS}" \
        --output_dir "$OUT/stage0" --max_steps "$STEPS0" --batch_size 128 --learning_rate 1e-3 --seed "$SEED"
fi

log "stage 1: projector and LM from scratch, solo images, naming and counting, $STEPS1 steps"
stage 1 "$OUT/stage0/final" solo "$STEPS1" 2e-3 0.3 "$BATCH" --config_overrides "$one_view" \
    --prune_method lavida "${frozen_siglip[@]}"
log "stage 2: solo images, counts only (matching question words to the image), $STEPS2 steps"
stage 2 "$OUT/stage1/final" solo-count "$STEPS2" 1e-3 0.3 "$BATCH" --prune_method lavida "${frozen_siglip[@]}"
log "stage 3: single images (1-3 entities), counts and positions, $STEPS3 steps"
stage 3 "$OUT/stage2/final" single-cp "$STEPS3" 1e-3 0.3 "$BATCH" --prune_method lavida "${frozen_siglip[@]}"
log "stage 4: grids, any-res views pooled (LaViDa-style), counts only, $STEPS4 steps"
stage 4 "$OUT/stage3/final" grid-count "$STEPS4" 1e-3 0.3 "$((BATCH / 2))" \
    --config_overrides '{"image_aspect_ratio": "anyres", "mm_2d_pool": null}' --prune_method pool "${frozen_siglip[@]}"
log "stage 5: grids, any-res views pooled (LaViDa-style), all question types, $STEPS5 steps"
stage 5 "$OUT/stage4/final" grid-all "$STEPS5" 1e-3 0.1 "$((BATCH / 2))" --prune_method pool "${frozen_siglip[@]}"
log "stage 6: SHIRG LoRA on grids, $STEPS6 steps"
stage 6 "$OUT/stage5/final" grid-all "$STEPS6" 1e-3 0.1 "$((BATCH / 2))" --prune_method shirg \
    --lora_enable True --lora_config scripts/lora_shirg.yaml --lora_r 16 --lora_alpha 32

log "copying the results to $MODEL_DIR and $MODEL_DIR-shirg-lora"
rm -rf "$MODEL_DIR.tmp" "$MODEL_DIR-shirg-lora.tmp"
mkdir -p "$(dirname "$MODEL_DIR")"
cp -r "$OUT/stage5/final" "$MODEL_DIR.tmp"
cp -r "$OUT/stage6/final" "$MODEL_DIR-shirg-lora.tmp"
rm -rf "$MODEL_DIR" "$MODEL_DIR-shirg-lora"
mv "$MODEL_DIR.tmp" "$MODEL_DIR"
mv "$MODEL_DIR-shirg-lora.tmp" "$MODEL_DIR-shirg-lora"
log "done"
