#!/usr/bin/env bash
# The exact commands that made the default heads shipped for the embedded model (smollm2-135m):
#   medusa_bench/data/heads/smollm2-135m-medusa   (Medusa-1, 4 heads of 2 ResBlocks through the shared lm_head)
#   medusa_bench/data/heads/smollm2-135m-medusa2  (Medusa-2 adapter: LoRA + 4 heads)
#   medusa_bench/data/heads/smollm2-135m-hydra    (Hydra++: 4 prefix-mlp heads, teacher loss)
#   medusa_bench/data/heads/smollm2-135m-eagle    (EAGLE-1/2: one draft layer over the last feature; eagle, eagle2)
#   medusa_bench/data/heads/smollm2-135m-eagle3   (EAGLE-3: three fused feature layers, 4096-token draft vocabulary)
# Data (never MT-Bench, Spec-Bench or quick-bench questions: distill refuses them and drops prompts
# close to one): the base model's own answers, two turns each, to
#   - the 427 self-instruct prompts in ../shared/data/self_instruct,
#   - the first 400 GSM8K-train questions (a share, so maths does not dominate),
#   - 1200 new instructions the model wrote itself from those seeds (`instructions`: de-duplicated,
#     length- and benchmark-overlap-filtered),
#   - and for every one of those a follow-up question the model wrote after its first answer,
#     answered in context (`distill --extend --follow-up model`), so turn-2 contexts are trained on.
# Answers are generated in bfloat16 (1.5x the fp32 throughput here, batched); the heads then train on
# the fp32 base's own hidden states and logits over that text. Each folder's training.json records
# the data recipe (sources, turns, tokens, overlap check), curve.csv and calibration.json.
#
# Every shipped folder comes from this data (data 66 min + base hidden states 17 min, and 18 more for
# EAGLE-3's three feature layers + training, every job capped by --max-minutes, on a 2-core AVX-512
# EPYC, one job at a time, OMP_NUM_THREADS=2). 2 ResBlocks per Medusa head beat 1 on held-out top-1
# at every head (0.38/0.21/0.14/0.11 against 0.36/0.20/0.13/0.10, same data and cap), so Medusa-1
# ships with 2 and Medusa-2 starts from them. Run one job at a time; on a shared machine use
# OMP_NUM_THREADS=1 (OpenMP threads spin-waiting on descheduled peers ran ~10x slower).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MEDUSA_BENCH_DATA:-../shared/data}
WORK=${WORK:-/tmp/medusa-bench-defaults}
HEADS=medusa_bench/data/heads
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MB=${MB:-medusa-bench}
mkdir -p "$WORK"

GEN="--model smollm2-135m --batch-size 32 --dtype bfloat16"
time $MB distill $GEN --max-new-tokens 160 --out "$WORK/turn1.jsonl" \
  --prompts "$DATA/self_instruct/seed_tasks.jsonl" --prompts "$DATA/self_instruct/user_oriented_instructions.jsonl"
time $MB distill $GEN --max-new-tokens 160 --out "$WORK/turn1.jsonl" --prompts "$DATA/gsm8k/train.jsonl" --limit 400
time $MB instructions $GEN --count 1200 --out "$WORK/bootstrap.jsonl" \
  --seeds "$DATA/self_instruct/seed_tasks.jsonl" --seeds "$DATA/self_instruct/user_oriented_instructions.jsonl"
time $MB distill $GEN --max-new-tokens 160 --out "$WORK/turn1.jsonl" --prompts "$WORK/bootstrap.jsonl"
time $MB distill $GEN --max-new-tokens 160 --out "$WORK/distill.jsonl" --extend "$WORK/turn1.jsonl" --follow-up model

time $MB train medusa --model smollm2-135m --data "$WORK/distill.jsonl" --heads 4 --layers 2 --lm-head shared \
  --epochs 2 --lr 1e-3 --max-minutes 10 --save-dtype float16 --out "$HEADS/smollm2-135m-medusa"

time $MB train medusa2 --model smollm2-135m --data "$WORK/distill.jsonl" --heads 4 \
  --init-heads "$HEADS/smollm2-135m-medusa" --lora-layers 8 --lora-r 8 --lr 1e-3 --heads-lr 5e-4 \
  --epochs 1 --max-minutes 8 --save-dtype float16 --out "$HEADS/smollm2-135m-medusa2"

time $MB train hydra --model smollm2-135m --data "$WORK/distill.jsonl" --arch prefix-mlp --heads 4 --loss teacher \
  --lm-head shared --epochs 2 --lr 1e-3 --max-minutes 20 --save-dtype float16 --out "$HEADS/smollm2-135m-hydra"

time $MB train eagle --model smollm2-135m --data "$WORK/distill.jsonl" --ttt-steps 3 \
  --epochs 2 --lr 1e-3 --max-minutes 6 --save-dtype float16 --out "$HEADS/smollm2-135m-eagle"

time $MB train eagle --eagle3 --model smollm2-135m --data "$WORK/distill.jsonl" --ttt-steps 3 --draft-vocab 4096 \
  --epochs 2 --lr 1e-3 --max-minutes 10 --save-dtype float16 --out "$HEADS/smollm2-135m-eagle3"
echo "all heads remade in $((SECONDS / 60)) min"
