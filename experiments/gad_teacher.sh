#!/usr/bin/env bash
# The README's distillation experiment (experiments/gad_teacher.yaml): make the student, then compare.
# The student is the quick start's SFT stage (experiments/default.yaml: 12 steps at 2e-5 on chit-chat replies).
set -euo pipefail
if [ ! -f runs/gad_teacher/student/config.json ]; then
  rlgen sft --model default --max_steps 12 --batch_size 8 --learning_rate 2.0e-5 --max_length 96 --threads 1 \
    --seed 0 --output_dir runs/gad_teacher/student
fi
rlgen compare --config experiments/gad_teacher.yaml "$@"
