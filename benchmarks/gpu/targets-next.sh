#!/usr/bin/env bash
# GPU host, sessions 3-4 of issue #8 (targets 1-4; see benchmarks/RESULTS.md). Run from the repo root with .whl
# carried (and .whl/deepspeed from benchmarks/gpu/deepspeed-wheels.sh for target 4); pick runs with ONLY="...":
#   ONLY="t3-qwen7b-dpo-2048-loft t3-qwen7b-dpo-1024-loft-trainer" bash benchmarks/gpu/targets-next.sh
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
Q=recipes/qwen2.5-7b
L=recipes/llama-3.1-8b
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true)

# Target 3: DPO at 2,048 tokens inside 11 GiB. Both runners overflowed 11 GiB in the loss (TRL: a pair's fp32
# logits; Liger's fused DPO loss: still one pair per chunk). LoftDPOTrainer (training/plugins/dpo.py) runs the LM head
# on completion tokens only, a few hundred at a time, and skips Axolotl's per-micro-batch gc/empty_cache. The
# baseline runs uncapped (it needs ~17 GiB at 2,048): its speed is the bar.
bench t3-qwen7b-dpo-2048-loft $Q/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 3 --vs baseline \
  --cap-gib 11 --baseline-cap-gib 0 --set sequence_len=2048 --set gradient_accumulation_steps=2 "${LIGER[@]}" \
  --set liger_glu_activation=true --set trainer_cls=training.plugins.dpo.LoftDPOTrainer
# The 12 GB recipe at its own 1,024 with Loft's trainer, against TRL under the same 12 GiB cap.
bench t3-qwen7b-dpo-1024-loft-trainer $Q/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 3 --vs baseline \
  --cap-gib 12 --set gradient_accumulation_steps=2 --set trainer_cls=training.plugins.dpo.LoftDPOTrainer

# The DPO recipes as written now (2,048 tokens, Liger layers, LoftDPOTrainer, embeddings_skip_upcast): the 12 GB
# one under target 3's 11 GiB cap against TRL uncapped, 5 timed steps; the precompute one under its 12 GiB card.
bench recipe-qwen7b-dpo-qlora-12gb $Q/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 5 --vs baseline \
  --cap-gib 11 --baseline-cap-gib 0 --set gradient_accumulation_steps=2
bench recipe-qwen7b-dpo-precompute-12gb $Q/dpo-qlora-precompute-12gb.yaml --data full --warmup 2 --steps 3 \
  --cap-gib 12 --set gradient_accumulation_steps=2

# Target 1 again, only to record Loft's peak memory (the first run lost it to Axolotl's counter resets).
bench t1-qwen7b-qlora-cap12-peak $Q/qlora-sft-8gb.yaml --cap-gib 12 --only loft --warmup 2 --steps 3 \
  --set sample_packing=true --set sequence_len=8192 --set gradient_accumulation_steps=1

# Target 4: 24,576 overflowed in one layer's MLP with offloading alone; tiled_mlp computes the MLP in sequence
# shards. Axolotl 0.19's tiled_mlp imports DeepSpeed's TiledMLP (installed here for these runs only); its default
# shard count targets 32K tokens per shard (one shard at 24K: no tiling); the fused LoRA MLP kernel replaces each
# MLP's forward per instance, hiding the class-level tiled forward; Liger's SwiGLU and tiled_mlp are refused together.
if [[ -d .whl/deepspeed && ! -d /tmp/site-ds ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-ds .whl/deepspeed/*.whl
fi
# long NAME SEQUENCE [options]: Llama-3.1-8B QLoRA on one packed full-length row, DeepSpeed on the path.
COMMON=(--data full --warmup 1 --steps 2 "${LIGER[@]}" --set liger_fused_linear_cross_entropy=true
        --set sample_packing=true --set micro_batch_size=1 --set gradient_accumulation_steps=1 --set lora_dropout=0
        --set embeddings_skip_upcast=true)
TILED=(--set activation_offloading=true --set lora_mlp_kernel=false --set tiled_mlp=true
       --set tiled_mlp_use_original_mlp=true --set tiled_mlp_num_shards=8)
long() {
  local name="$1" seq="$2"; shift 2
  PYTHONPATH="/tmp/site-ds:$PYTHONPATH" bench "$name" $L/qlora-conservative-24gb.yaml "${COMMON[@]}" \
    --set sequence_len="$seq" "$@"
}
long t4-llama8b-qlora-24k-tiled-cap12 24576 "${TILED[@]}" --cap-gib 12
long t4-llama8b-qlora-32k-tiled-cap12 32768 "${TILED[@]}" --cap-gib 12
# With the MLP tiled, 24,576 and 32,768 ran out of memory in the attention backward instead (11.71 / 11.63 GiB
# allocated): find the longest that fits, between the measured 16,384 (no offloading: 12.84 GiB) and 24,576.
long t4-llama8b-qlora-20k-tiled-cap12 20480 "${TILED[@]}" --cap-gib 12
long t4-llama8b-qlora-22k-tiled-cap12 22528 "${TILED[@]}" --cap-gib 12
# 20,480 and 22,528 ran out of memory too, each at ~11.7 GiB: run without the cap to read what they need.
long t4-llama8b-qlora-20k-tiled-nocap 20480 "${TILED[@]}"
long t4-llama8b-qlora-24k-tiled-nocap 24576 "${TILED[@]}"
# Uncapped, tiled + offloaded needed 16.44 GiB at 20,480 and 18.57 at 24,576: more than the 12.84 GiB the shared
# README measured at 16,384 with neither. Which lever costs memory? 16,384 uncapped: neither, offloading, both.
long t4-llama8b-qlora-16k-plain 16384 --set liger_glu_activation=true
long t4-llama8b-qlora-16k-offload 16384 --set liger_glu_activation=true --set activation_offloading=true
long t4-llama8b-qlora-16k-offload-tiled 16384 "${TILED[@]}"
# At 16,384: offloading saved 1.39 GiB (12.26 -> 10.88), the tiled MLP then added 3.43 (it needs the LoRA MLP kernel
# off). The longest that fits 12 GiB, then, with offloading and the fused kernels: 16,384 and 18,432 under the cap.
long t4-llama8b-qlora-16k-offload-cap12 16384 --set liger_glu_activation=true --set activation_offloading=true --cap-gib 12
long t4-llama8b-qlora-18k-offload-cap12 18432 --set liger_glu_activation=true --set activation_offloading=true --cap-gib 12
# Axolotl 0.19's activation_offloading: true is TRL's offloader, which *replaces* recomputation (HF checkpointing
# is switched off: every activation goes to CPU, through streams that keep several resident). Its other modes:
# "hidden_states" offloads only the checkpointed layer inputs and keeps recomputation (Unsloth-style), "legacy"
# is the synchronous offloader.
long t4-llama8b-qlora-24k-hidden-cap12 24576 --set liger_glu_activation=true --set activation_offloading=hidden_states --cap-gib 12
long t4-llama8b-qlora-24k-legacy-cap12 24576 --set liger_glu_activation=true --set activation_offloading=legacy --cap-gib 12
long t4-llama8b-qlora-20k-hidden-cap12 20480 --set liger_glu_activation=true --set activation_offloading=hidden_states --cap-gib 12
# hidden_states fitted 24,576 in 9.93 GiB at 5,241 tok/s (legacy: 9.14 GiB at half the speed): try 32,768.
long t4-llama8b-qlora-32k-hidden-cap12 32768 --set liger_glu_activation=true --set activation_offloading=hidden_states --cap-gib 12
long t4-llama8b-qlora-32k-legacy-cap12 32768 --set liger_glu_activation=true --set activation_offloading=legacy --cap-gib 12

# Session 4 (one host call per ONLY= group, recorded in host_call): the TRL baselines that make targets 2 and 4
# same-run comparisons, then targets 1 and 2 on full-length rows. Results: benchmarks/RESULTS.md.
# Target 2: the bf16 recipe (target 2's settings) against TRL SFTTrainer + PEFT bf16 LoRA at the same tokens per step.
bench t2-llama8b-lora-bf16-vs-baseline $L/lora-bf16-80gb.yaml --vs baseline --warmup 2 --steps 4 \
  --set gradient_accumulation_steps=1
# Target 4: the long recipe as written (24,576) against the baseline (TRL SFTTrainer, checkpointing, no Liger, no
# offloading) under the same 12 GiB cap, and at lengths both fit; then the baseline alone, for its own longest.
# sweep NAME N [--vs baseline | --only baseline]: the long recipe at N tokens, one full document per step, 12 GiB.
sweep() {
  local name="$1" n="$2"; shift 2
  bench "$name" $L/qlora-long-12gb.yaml --data full --warmup 1 --steps 2 "$@" --cap-gib 12 --set sequence_len="$n" \
    --set gradient_accumulation_steps=1
}
# (32768 and 10240, the two runners' longest, were a later call of the same session.)
for n in 24576 4096 2048 32768 10240; do sweep "t4-llama8b-long-vs-baseline-$n" $n --vs baseline; done
# The baseline fitted 8,192 (10.75 / 12.00 GiB) and not 24,576; 16384 12288 10240 asked where between them it stops.
for n in 8192 1024 16384 12288 10240; do sweep "t4-llama8b-long-baseline-$n" $n --only baseline; done
# Target 2 on full-length rows: with 188-token Shakespeare rows most of the 13× above is packing (the baseline runs
# 22 micro-batches of 2 short rows per step); with every row 4,096 tokens both runners see the same batches.
bench t2-llama8b-lora-bf16-full-vs-baseline $L/lora-bf16-80gb.yaml --data full --vs baseline --warmup 2 --steps 4 \
  --set gradient_accumulation_steps=1
# Target 1 on full-length rows: the 27.5× of gpu/qwen.sh is mostly packing (43 short rows per step for the
# baseline). With every row 8,192 tokens both runners see the same batches; if the baseline does not fit 12 GiB,
# time it uncapped.
bench t1-qwen7b-qlora-12gb-full-vs-baseline $Q/qlora-sft-12gb.yaml --data full --vs baseline --warmup 2 --steps 3 \
  --cap-gib 12 --set gradient_accumulation_steps=1
if [[ $(field t1-qwen7b-qlora-12gb-full-vs-baseline baseline status) == does_not_fit ]]; then
  bench t1-qwen7b-qlora-12gb-full-baseline-nocap $Q/qlora-sft-12gb.yaml --data full --only baseline --warmup 2 \
    --steps 3 --set gradient_accumulation_steps=1
fi
# Target 1 again, the 12 GB recipe as written against the baseline with more warm-up: in the first run the
# baseline's step times were still falling during the timed steps (39.6, 30.3 | 29.9, 25.5, 22.1 s).
bench t1-qwen7b-qlora-12gb-vs-baseline $Q/qlora-sft-12gb.yaml --vs baseline --warmup 4 --steps 4 --cap-gib 12
