#!/usr/bin/env bash
# GLIP's self-training claim in miniature, on the synthetic shapes (README.md in this folder has the results).
#
#   bash examples/selftraining/run_experiment.sh            # from the repository root; about 2 h of a shared 2-core CPU
#   nohup bash examples/selftraining/run_experiment.sh > runs/selftrain.log 2>&1 &
#
# 1. data: 400 labelled training images (boxes + captions), a captions-only split of 4000 images (boxes withheld;
#    every colour-shape pair, the 10 held out of the labelled data included), 300 images per test split
# 2. teacher = student (a): the demo-sized GLIP trained on the labelled subset only
# 3. the teacher pseudo-labels the captions-only split (examples/pseudo_label_glip.py, default filters)
# 4. student (b): the same initialisation, steps, seed and recipe, on the labelled subset (listed twice) + the
#    pseudo-labelled captions
# 5. COCO mAP of both on test_seen / test_unseen (all 48 names in every prompt), and the pseudo-label quality
#    against the withheld boxes (a diagnostic only: nothing trains on the withheld boxes)
#
# Every step is skipped when its output exists, so the script resumes where it stopped (the training runs resume
# from their last checkpoint with --resume_from_checkpoint latest; pseudo-labelling skips its finished units).
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PY:-.venv/bin/python}"
DATA="${DATA:-data/selftrain}"
RUNS="${RUNS:-runs/selftrain}"
STEPS="${STEPS:-1200}"

[ -f "$DATA/metadata.json" ] || "$PY" examples/synthetic_shapes.py --output "$DATA" --train-images 400 --test-images 300 --caption-images 4000 --seed 0
[ -f "$RUNS/init/glip_config.json" ] || "$PY" examples/demo/build_glip_demo.py init --data "$DATA" --output "$RUNS/init" --regularization 0
[ -f "$RUNS/labelled/train_grounding.jsonl" ] || "$PY" examples/selftraining/experiment.py to_jsonl --data "$DATA" --output "$RUNS/labelled"

train() {  # train <output_dir> <train files...>: the one recipe of the teacher and both students
  local output="$1"; shift
  [ -d "$output/model_ema" ] && return
  local resume=()
  if ls -d "$output"/checkpoint-[0-9]* > /dev/null 2>&1; then resume=(--resume_from_checkpoint latest); fi
  "$PY" examples/pretrain_glip.py --cpu --config "$RUNS/init/glip_config.json" \
    --text_encoder "$RUNS/init/text_encoder" --categories "$RUNS/init/seen_categories.json" \
    --train_files "$@" --image_root "$DATA" \
    --min_sizes 160 --max_size 267 --max_negatives 3 --per_device_batch_size 8 --num_workers 0 \
    --max_steps "$STEPS" --warmup_steps 100 --learning_rate 1e-3 --text_learning_rate 2e-4 --lr_steps 0.75 0.92 \
    --ema_decay 0.995 --checkpointing_steps 300 --logging_steps 50 --seed 0 --output_dir "$output" "${resume[@]}"
}

# teacher = student (a): labelled subset only
train "$RUNS/student_a" "$RUNS/labelled/train_detection.jsonl" "$RUNS/labelled/train_grounding.jsonl"

# the teacher pseudo-labels the captions-only split; records name images relative to $DATA, like the labelled ones
[ -f "$RUNS/pseudo/manifest.json" ] || "$PY" examples/pseudo_label_glip.py --cpu --teacher "$RUNS/student_a/model_ema" \
  --data_dir "$DATA/captions" --image_root "$DATA" --min_size 160 --max_size 267 \
  --batch_size 8 --num_workers 1 --shard_size 500 --output_dir "$RUNS/pseudo"
[ -f "$RUNS/pseudo_quality.json" ] || "$PY" examples/selftraining/experiment.py quality --data "$DATA" --pseudo "$RUNS/pseudo" > "$RUNS/pseudo_quality.json"

# student (b): labelled subset (twice, as GLIP repeats its gold data) + pseudo-labelled captions
train "$RUNS/student_b" "$RUNS/labelled/train_detection.jsonl" "$RUNS/labelled/train_grounding.jsonl" \
  "$RUNS/labelled/train_detection.jsonl" "$RUNS/labelled/train_grounding.jsonl" "$RUNS"/pseudo/shards/*.jsonl

for model in student_a student_b; do
  for split in test_seen test_unseen; do
    [ -f "$RUNS/eval-$model-$split.json" ] || "$PY" examples/evaluate_glip.py --model "$RUNS/$model/model_ema" \
      --annotations "$DATA/${split}_detection.json" --images "$DATA" --min_size 160 --max_size 267 \
      --output "$RUNS/eval-$model-$split.json" > /dev/null
  done
done
"$PY" examples/selftraining/experiment.py table --runs "$RUNS" --models student_a student_b
