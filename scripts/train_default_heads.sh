#!/usr/bin/env bash
# The exact commands that made the default heads shipped for the embedded model (smollm2-135m):
#   medusa_bench/data/heads/smollm2-135m-medusa   (Medusa-1, 4 heads through the shared lm_head)
#   medusa_bench/data/heads/smollm2-135m-medusa2  (Medusa-2 adapter: LoRA + 4 heads)
#   medusa_bench/data/heads/smollm2-135m-hydra    (Hydra++: 4 prefix-mlp heads, teacher loss)
#   medusa_bench/data/heads/smollm2-135m-eagle    (EAGLE-1/2: one draft layer over the last feature; eagle, eagle2)
#   medusa_bench/data/heads/smollm2-135m-eagle3   (EAGLE-3: three fused feature layers, 4096-token draft vocabulary)
# Data: the base model's own greedy answers to the 427 self-instruct prompts in
# ../shared/data/self_instruct -- never MT-Bench or Spec-Bench questions (distill refuses them).
# Each folder's training.json / curve.csv / calibration.json record what the run measured.
#
# OMP_NUM_THREADS=1: the 2-core machine these ran on was shared by several jobs; one thread per
# job ran ~10x faster than two (OpenMP threads spin-waiting on descheduled peers).
# Every step resumes: distill appends and skips finished prompts, and the base hidden states are
# cached on disk per sequence, so re-running this script after a kill continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MEDUSA_BENCH_DATA:-../shared/data}
WORK=${WORK:-/tmp/medusa-bench-defaults}
HEADS=medusa_bench/data/heads
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MB=${MB:-medusa-bench}
mkdir -p "$WORK"

time $MB distill --model smollm2-135m \
  --prompts "$DATA/self_instruct/seed_tasks.jsonl" --prompts "$DATA/self_instruct/user_oriented_instructions.jsonl" \
  --max-new-tokens 160 --batch-size 32 --out "$WORK/distill.jsonl"

time $MB train medusa --model smollm2-135m --data "$WORK/distill.jsonl" --heads 4 --lm-head shared \
  --epochs 4 --lr 1e-3 --max-minutes 12 --save-dtype float16 --out "$HEADS/smollm2-135m-medusa"

time $MB train medusa2 --model smollm2-135m --data "$WORK/distill.jsonl" --heads 4 \
  --init-heads "$HEADS/smollm2-135m-medusa" --lora-layers 8 --lora-r 8 --lr 5e-4 --heads-lr 5e-4 \
  --epochs 1 --max-minutes 12 --save-dtype float16 --out "$HEADS/smollm2-135m-medusa2"

time $MB train hydra --model smollm2-135m --data "$WORK/distill.jsonl" --arch prefix-mlp --heads 4 --loss teacher \
  --lm-head shared --epochs 5 --lr 1e-3 --max-minutes 13 --save-dtype float16 --out "$HEADS/smollm2-135m-hydra"

time $MB train eagle --model smollm2-135m --data "$WORK/distill.jsonl" --ttt-steps 3 \
  --epochs 6 --lr 1e-3 --max-minutes 12 --save-dtype float16 --out "$HEADS/smollm2-135m-eagle"

time $MB train eagle --eagle3 --model smollm2-135m --data "$WORK/distill.jsonl" --ttt-steps 3 --draft-vocab 4096 \
  --epochs 6 --lr 1e-3 --max-minutes 12 --save-dtype float16 --out "$HEADS/smollm2-135m-eagle3"
