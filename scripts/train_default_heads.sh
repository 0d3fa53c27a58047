#!/usr/bin/env bash
# The exact commands that make the default heads shipped for the embedded model (smollm2-135m):
#   medusa_bench/data/heads/smollm2-135m-medusa   (Medusa-1, 4 heads of 2 ResBlocks through the shared lm_head)
#   medusa_bench/data/heads/smollm2-135m-medusa2  (Medusa-2 adapter: LoRA + 4 heads)
#   medusa_bench/data/heads/smollm2-135m-hydra    (Hydra++: 3 prefix-mlp heads, teacher loss)
#   medusa_bench/data/heads/smollm2-135m-eagle    (EAGLE-1/2: one draft layer over the last feature; eagle, eagle2)
#   medusa_bench/data/heads/smollm2-135m-eagle3   (EAGLE-3: three fused feature layers, 4096-token draft vocabulary,
#                                                  the paper's 7 training-time-test steps)
# Data (never MT-Bench, Spec-Bench or quick-bench questions: distill refuses them and drops prompts
# close to one): the committed distillation pack data/distill/smollm2-135m when it holds parts
# (DEVELOPERS.md), else distilled here: the base model's own answers, two turns each, to
#   - the 427 self-instruct prompts in ../shared/data/self_instruct,
#   - the first 400 GSM8K-train questions (a share, so maths does not dominate),
#   - 1200 new instructions the model wrote itself from those seeds (`instructions`: de-duplicated,
#     length- and benchmark-overlap-filtered),
#   - and for every one of those a follow-up question the model wrote after its first answer,
#     answered in context (`distill --extend --follow-up model`), so turn-2 contexts are trained on.
# Answers are generated in the dtype --dtype auto measures fastest; the heads then train on the fp32 base's own hidden states and
# logits over that text. Every trainer evaluates on its held-out split every --eval-every steps
# (default: evaluations ~10% of the time), drops the learning rate when mean held-out top-1
# plateaus and stops at the third plateau, keeping the best weights; --epochs is only a maximum.
# training.json records why each run stopped ("converged", "max epochs", "time cap"), curve.csv
# every evaluation, calibration.json the tree optimiser's statistics. Heads are stored as int8 matrices
# with a scale per row (`--save-dtype int8`; loaders upcast): all five folders ~29 MB, half of 16-bit.
# Hydra ships 3 heads: its fourth is used only by trees deeper than 3, i.e. bigger than ~16 nodes
# (predicted τ +0.03 at 16 nodes, +0.07 at 48), and costs 3.3 MB of the 30 MB the shipped heads may take.
#
# DEVICE=cpu (default): one job at a time, no time cap (hours on a 2-core CPU; use OMP_NUM_THREADS=1
# on a shared machine: OpenMP threads spin-waiting on descheduled peers ran ~10x slower).
# DEVICE=cuda (or --device cuda): everything in one 600 s call on one H100: distillation batched in
# bfloat16 (skipped when the pack is there), training in fp32 with bigger batches, the four
# frozen-base trainers side by side (each its own hidden-state cache), Medusa-2 after Medusa-1, each
# with a --max-minutes safety cap that keeps the sum inside the call. UNTESTED on a GPU so far.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--device" ] && DEVICE=$2
DEVICE=${DEVICE:-cpu}
DATA=${MEDUSA_BENCH_DATA:-../shared/data}
WORK=${WORK:-/tmp/medusa-bench-defaults}
HEADS=${HEADS:-medusa_bench/data/heads}
PACK=${PACK:-data/distill/smollm2-135m}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MB=${MB:-medusa-bench}
mkdir -p "$WORK"

if [ "$DEVICE" = cuda ]; then
  GEN="--model smollm2-135m --batch-size 256 --dtype bfloat16 --device cuda"
  RUN="--device cuda --dtype float32"
  # [medusa, medusa2, hydra, eagle, eagle3]: batch sizes (positions or assistant tokens; Medusa-2:
  # sequences) and safety caps in minutes: 4.5 min on the longest chain (medusa, then medusa2),
  # leaving ~5 min of the call for distillation, model loads, hidden states and the held-out writes.
  B=(2048 16 2048 2048 2048); M=(1 3.5 4 3 4)
else
  GEN="--model smollm2-135m --dtype auto"  # bf16 only where a 64-row step measures faster (fp32 on the Zen 2 EPYC: 4.9x)
  RUN="--dtype float32"  # --dtype auto would train on bf16 hidden states on a CPU with native bf16
  B=(256 4 256 256 256); M=(- - - - -)
fi
# GPU only: the cap, and a hidden-state cache per parallel job (two writers of one cache would race).
cap() { [ "$DEVICE" = cuda ] && echo "--max-minutes $1" || true; }
cache() { [ "$DEVICE" = cuda ] && echo "--hidden-cache $WORK/hidden-$1" || true; }

# Distillation resumes from the committed packs (DEVELOPERS.md): turn-1 answers in $PACK-turn1,
# two-turn conversations in $PACK; each command skips what the packs hold and seals every full 64.
# On the GPU a pack that holds parts is used as it is (the device call cannot commit new parts).
if [ "$DEVICE" = cuda ] && compgen -G "$PACK/part-*.jsonl.xz" > /dev/null; then
  TRAIN="$PACK"
else
  T1="--out $WORK/turn1.jsonl --pack $PACK-turn1 --max-new-tokens 160"
  time $MB distill $GEN $T1 --prompts "$DATA/self_instruct/seed_tasks.jsonl" --prompts "$DATA/self_instruct/user_oriented_instructions.jsonl"
  time $MB distill $GEN $T1 --prompts "$DATA/gsm8k/train.jsonl" --limit 400
  time $MB instructions --model smollm2-135m --count 1200 --out "$WORK/bootstrap.jsonl" \
    --seeds "$DATA/self_instruct/seed_tasks.jsonl" --seeds "$DATA/self_instruct/user_oriented_instructions.jsonl"
  time $MB distill $GEN $T1 --prompts "$WORK/bootstrap.jsonl"
  $MB pack seal --out "$WORK/turn1.jsonl" --pack "$PACK-turn1" --final
  time $MB distill $GEN --out "$WORK/distill.jsonl" --pack "$PACK" --max-new-tokens 160 --extend "$PACK-turn1" --follow-up model
  $MB pack seal --out "$WORK/distill.jsonl" --pack "$PACK" --final
  TRAIN="$PACK"
fi
COMMON="--model smollm2-135m --data $TRAIN $RUN --save-dtype int8"

medusa_chain() {
  $MB train medusa $COMMON --heads 4 --layers 2 --lm-head shared --lr 1e-3 --batch-size ${B[0]} $(cap ${M[0]}) \
    $(cache last) --out "$HEADS/smollm2-135m-medusa"
  # Medusa-2: joint epochs until the heads' held-out top-1 on the adapted backbone converges (the
  # shipped CPU run stopped after 82 steps of 4 sequences, before the backbone had moved much).
  $MB train medusa2 $COMMON --heads 4 --init-heads "$HEADS/smollm2-135m-medusa" --lora-layers 8 --lora-r 8 \
    --lr 1e-3 --heads-lr 5e-4 --batch-size ${B[1]} $(cap ${M[1]}) $(cache last) \
    --out "$HEADS/smollm2-135m-medusa2"
}
hydra() {
  $MB train hydra $COMMON --arch prefix-mlp --heads 3 --loss teacher --lm-head shared --lr 1e-3 --batch-size ${B[2]} \
    $(cap ${M[2]}) $(cache hydra) --out "$HEADS/smollm2-135m-hydra"
}
eagle() {
  $MB train eagle $COMMON --ttt-steps 3 --lr 1e-3 --batch-size ${B[3]} $(cap ${M[3]}) \
    $(cache eagle) --out "$HEADS/smollm2-135m-eagle"
}
eagle3() {
  $MB train eagle --eagle3 $COMMON --ttt-steps 7 --draft-vocab 4096 --lr 1e-3 --batch-size ${B[4]} $(cap ${M[4]}) \
    $(cache eagle3) --out "$HEADS/smollm2-135m-eagle3"
}

if [ "$DEVICE" = cuda ]; then  # side by side on the one GPU; any failure fails the script
  pids=()
  for job in medusa_chain hydra eagle eagle3; do $job > "$WORK/$job.log" 2>&1 & pids+=($!); done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  tail -n 3 "$WORK"/*.log
  [ $status = 0 ]
else
  for job in medusa_chain hydra eagle eagle3; do time $job; done
fi
echo "all heads remade in $((SECONDS / 60)) min"
