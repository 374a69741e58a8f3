#!/usr/bin/env bash
# Build the CPU testbed's models from scratch (about 110 min on a 2-core CPU; run it on an idle
# machine: two trainings at once are each ~3x slower). The results are checked in under
# benchmarks/testbed/models/, so `make demo` and the benchmark never need this.
#
#   bash benchmarks/testbed/build.sh            # everything
#   STAGES="drafters" bash benchmarks/testbed/build.sh   # only the MASSV drafters
#   STAGES="msd" bash benchmarks/testbed/build.sh        # only the MSD drafters
#   STAGES="eagle3" bash benchmarks/testbed/build.sh     # only the EAGLE-3 head
#   FAMILY=qwen3_vl bash benchmarks/testbed/build.sh    # the Qwen3-VL testbed (qwen3-vl/models;
#                     about 55 min: target 28 min, blind LM 5 min, generation 3 min, drafters
#                     17 min; as below without the M-RoPE ablation, MSD and EAGLE-3, plus the
#                     drafter whose projector reads the main embedding only)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
MASSV=${MASSV:-.venv/bin/massv}
FAMILY=${FAMILY:-qwen2_5_vl}
if [[ $FAMILY == qwen3_vl ]]; then
  M=benchmarks/testbed/qwen3-vl/models
  W=${WORK:-.cache/testbed/build-qwen3-vl}
  STAGES=${STAGES:-"target blind data generate drafters"}
  TARGET_MINUTES=${TARGET_MINUTES:-28}
  TARGET_MORE_MINUTES=${TARGET_MORE_MINUTES:-0}
  BLIND_MINUTES=${BLIND_MINUTES:-5}
  # projector inputs compared (issue 24): main + DeepStack levels (chosen on the val split:
  # image tau 4.63 vs 4.40, benchmarks/results/cpu-testbed-qwen3-vl-val.md) / main embedding only
  VARIANTS=${VARIANTS:-"1d:post_merger_deepstack: 1d:post_merger:-main"}
else
  M=benchmarks/testbed/models
  W=${WORK:-.cache/testbed/build}
  STAGES=${STAGES:-"target blind data generate drafters msd eagle3"}
  TARGET_MINUTES=${TARGET_MINUTES:-36}
  TARGET_MORE_MINUTES=${TARGET_MORE_MINUTES:-20}   # a continuation at lr 1.5e-3 (as checked in)
  BLIND_MINUTES=${BLIND_MINUTES:-6}
  # positions compared: 1-D (the MASSV drafter) and the target's M-RoPE (the ablation)
  VARIANTS=${VARIANTS:-"1d:post_merger: mrope:post_merger:-mrope"}
fi
N_DISTILL=${N_DISTILL:-8000}
# Phase 2 (sdvit) epochs, also for the distilled control: 6 since issue 14 (held-out agreement
# 0.966 -> 0.974, vLLM tau on image prompts 4.35 -> 4.64 at k = 4; 3 epochs before, see
# benchmarks/results/cpu-testbed-recipes.md).
SDVIT_EPOCHS=${SDVIT_EPOCHS:-6}
export PYTHONPATH=.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-auto}
mkdir -p "$W" "$M"
has() { [[ " $STAGES " == *" $1 "* ]]; }
# install_head SRC NAME: copy a trained EAGLE-path head (MSD, EAGLE-3) into $M/NAME
install_head() {
  rm -rf "$M/$2"
  mkdir -p "$M/$2"
  cp "$1"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,train_summary.json,train_log.jsonl} "$M/$2/"
  cp "$1"/chat_template.* "$M/$2/" 2>/dev/null || true
}

# 1. The target VLM and the blind text LM (plain PyTorch + transformers, fresh samples).
if has target; then
  $PY -m benchmarks.testbed.models target --family "$FAMILY" --out $M/target \
    --minutes "$TARGET_MINUTES"
  if [[ $TARGET_MORE_MINUTES != 0 ]]; then
    $PY -m benchmarks.testbed.models target --family "$FAMILY" --out $M/target \
      --minutes "$TARGET_MORE_MINUTES" --lr 1.5e-3 --resume
  fi
fi
has blind && $PY -m benchmarks.testbed.models blind --family "$FAMILY" --out $M/blind \
  --minutes "$BLIND_MINUTES"

# 2. Distillation prompts: the train split (held-out scenes never appear in it).
has data && $PY benchmarks/testbed/task.py --out "$W/data" --train "$N_DISTILL" --val 200 --test 200

# 3. Self-distillation data: the target answers every train prompt (greedy), in vLLM.
has generate && $MASSV generate --target $M/target --llava-json "$W/data/train.json" \
  --out "$W/distill" --max-tokens 96 --dtype float32 --enforce-eager --max-num-seqs 64 \
  --max-num-batched-tokens 4096 --shard-size 1000 --no-progress

# 4. Drafters, with massv itself: each VARIANT is POSITIONS:FEATURE_TAP:SUFFIX (the first one,
#    without a suffix, is drafter-massv; phase 1 is kept for it).
if has drafters; then
  FEAT="$W/features"
  for V in $VARIANTS; do
    IFS=: read -r POS TAP SUFFIX <<< "$V"
    $MASSV init --target $M/target --draft-lm $M/blind --out "$W/init-massv$SUFFIX" \
      --projector mlp2x_gelu --positions $POS --feature-tap $TAP
    $MASSV train --phase align --drafter "$W/init-massv$SUFFIX" --data "$W/distill" \
      --target $M/target --out "$W/phase1$SUFFIX" --epochs 1 --batch-size 32 --lr 2e-3 \
      --feature-cache "$FEAT"
    $MASSV train --phase sdvit --drafter "$W/phase1$SUFFIX" --data "$W/distill" \
      --target $M/target --out "$W/massv$SUFFIX" --epochs "$SDVIT_EPOCHS" --batch-size 32 --lr 1e-3 \
      --feature-cache "$FEAT"
  done
  # The text-only baseline (the blind LM through the MASSV proposer, no projector) is derived
  # from blind/ at run time (assets.ensure); its distilled twin is the control.
  $MASSV init --target $M/target --draft-lm $M/blind --out "$W/drafter-blind" --projector none
  $MASSV train --phase sdvit --drafter "$W/drafter-blind" --data "$W/distill" \
    --target $M/target --out "$W/distilled" --epochs "$SDVIT_EPOCHS" --batch-size 32 --lr 1e-3 \
    --feature-cache "$FEAT"
  PAIRS="phase1:drafter-phase1 distilled:drafter-distilled"
  for V in $VARIANTS; do
    IFS=: read -r _ _ SUFFIX <<< "$V"
    PAIRS="$PAIRS massv$SUFFIX:drafter-massv$SUFFIX"
  done
  for pair in $PAIRS; do
    rm -rf "$M/${pair#*:}"
    mkdir -p "$M/${pair#*:}"
    cp "$W/${pair%%:*}"/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,train_summary.json,train_log.jsonl,README.md} "$M/${pair#*:}/"
    cp "$W/${pair%%:*}"/chat_template.* "$M/${pair#*:}/" 2>/dev/null || true
  done
fi
# 5. MSD drafters (issue 11): a 1-layer EAGLE-style head on the target's hidden states, from one
#    init, trained on the same distillation data with as many examples as MASSV's two phases
#    (238 + 714 steps of 32 = 4 epochs: 2 text-only, then the image share 0.5, 1), with and
#    without decoupled visual tokens.
if has msd; then
  $MASSV init --method msd --target $M/target --out "$W/init-msd"
  for V in msd msd-no-decouple; do
    FLAG=$([[ $V == msd-no-decouple ]] && echo "--no-decouple" || true)
    $MASSV train --method msd $FLAG --drafter "$W/init-msd" --data "$W/distill" \
      --target $M/target --out "$W/$V" --epochs 4 --batch-size 32 --lr 1e-3 --warmup-steps 50 \
      --feature-cache "$W/features"
    install_head "$W/$V" "drafter-$V"
  done
fi
# 6. EAGLE-3 head (issue 12): vLLM's own EAGLE-3 layout (fc over target layers 1, 3, 5 + one
#    decoder layer, no image embeddings), training-time test over k = 4 draft steps, the same data
#    and number of examples as MSD (952 steps of 32), served by stock vLLM with method eagle3.
if has eagle3; then
  $MASSV init --method eagle3 --target $M/target --out "$W/init-eagle3"
  $MASSV train --method eagle3 --drafter "$W/init-eagle3" --data "$W/distill" \
    --target $M/target --out "$W/eagle3" --epochs 4 --batch-size 32 --lr 1e-3 --warmup-steps 50 \
    --feature-cache "$W/features"
  install_head "$W/eagle3" drafter-eagle3
fi
du -sh $M/*
