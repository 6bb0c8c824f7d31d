#!/usr/bin/env bash
# Llama-3.1-8B QLoRA: the longest sequence that trains inside a 12 GiB memory cap, for Loft and for the
# hand-written TRL baseline (benchmarks/baseline_trl.py; checkpointing, no Liger, no offloading), one full-length
# document per step. Run names start `t4-`: the fourth of the four speed goals in benchmarks/RESULTS.md. One 80 GB
# GPU (measured on an H100 80GB; device kind nvidia-h200). Run from the repo root with the host wheelhouse carried
# as .whl, plus .whl/deepspeed (benchmarks/gpu/deepspeed-wheels.sh) for the tiled-MLP runs; one host call holds a
# few of these runs, so pick them with ONLY:
#   ONLY="t4-llama8b-long-vs-baseline-24576 t4-llama8b-long-vs-baseline-4096" bash benchmarks/gpu/longest-sequence-12gib.sh
# Results in $OUT; committed: benchmarks/results/speed-2026-11-22.json. The runs follow each other as the search
# did: each comment says what the runs before it found.
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
L=recipes/llama-3.1-8b
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true)

# First try: checkpointed layer inputs offloaded to CPU, Liger, no LoRA dropout (it keeps a copy of every
# projection's input).
bench t4-llama8b-qlora-24k-cap12 $L/qlora-conservative-24gb.yaml --cap-gib 12 --data full --warmup 1 --steps 2 \
  "${LIGER[@]}" --set liger_glu_activation=true --set liger_fused_linear_cross_entropy=true \
  --set sample_packing=true --set micro_batch_size=1 --set gradient_accumulation_steps=1 --set lora_dropout=0 \
  --set activation_offloading=true --set sequence_len=24576

# 24,576 overflowed in one layer's MLP with offloading alone; tiled_mlp computes the MLP in sequence shards.
# Axolotl 0.19's tiled_mlp imports DeepSpeed's TiledMLP (installed here for these runs only); its default shard
# count aims at 32K tokens per shard (one shard at 24K: no tiling), hence 8 shards; the fused LoRA MLP kernel
# replaces each MLP's forward per instance, hiding the class-level tiled forward, so it is off; Liger's SwiGLU and
# tiled_mlp are refused together.
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
# allocated): find the longest that fits, between 16,384 (no offloading: 12.84 GiB) and 24,576.
long t4-llama8b-qlora-20k-tiled-cap12 20480 "${TILED[@]}" --cap-gib 12
long t4-llama8b-qlora-22k-tiled-cap12 22528 "${TILED[@]}" --cap-gib 12
# 20,480 and 22,528 ran out of memory too, each at ~11.7 GiB: run without the cap to read what they need.
long t4-llama8b-qlora-20k-tiled-nocap 20480 "${TILED[@]}"
long t4-llama8b-qlora-24k-tiled-nocap 24576 "${TILED[@]}"
# Uncapped, tiled + offloaded needed 16.44 GiB at 20,480 and 18.57 at 24,576: more than the 12.84 GiB measured at
# 16,384 with neither. Which lever costs memory? 16,384 uncapped: neither, offloading, both.
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

# The long recipe (hidden_states offloading, 24,576 as written) against the baseline under the same 12 GiB cap,
# at lengths both fit and at each runner's longest; then the baseline alone, for its own longest.
# sweep NAME N [--vs baseline | --only baseline]: the long recipe at N tokens, one full document per step, 12 GiB.
sweep() {
  local name="$1" n="$2"; shift 2
  bench "$name" $L/qlora-long-12gb.yaml --data full --warmup 1 --steps 2 "$@" --cap-gib 12 --set sequence_len="$n" \
    --set gradient_accumulation_steps=1
}
for n in 24576 4096 2048 32768 10240; do sweep "t4-llama8b-long-vs-baseline-$n" $n --vs baseline; done
# The baseline fitted 8,192 (10.75 / 12.00 GiB) and not 24,576; 16,384, 12,288 and 10,240 ask where between them
# it stops.
for n in 8192 1024 16384 12288 10240; do sweep "t4-llama8b-long-baseline-$n" $n --only baseline; done
