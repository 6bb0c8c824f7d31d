#!/usr/bin/env bash
# GPU host, NOT RUN YET: the next attempts at issue #8's targets 3 and 4 (see benchmarks/RESULTS.md).
# Run from the repo root with .whl carried:  bash benchmarks/gpu/targets-next.sh   (about 8 minutes; results in $OUT)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
Q=recipes/qwen2.5-7b
L=recipes/llama-3.1-8b
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true
       --set liger_glu_activation=true)

# Target 3: at 2,048 both runners overflowed 11 GiB by about one pair's logits. The precomputed-reference recipe
# runs no reference pass during training (10.44 -> 8.56 GiB at 1,024); add Liger's fused DPO loss and offload the
# policy's checkpointed layer inputs.
bench t3-qwen7b-dpo-2048-precompute $Q/dpo-qlora-precompute-12gb.yaml --data full --warmup 2 --steps 3 \
  --vs baseline --cap-gib 11 --set sequence_len=2048 --set gradient_accumulation_steps=2 "${LIGER[@]}" \
  --set dpo_use_liger_kernel=true --set activation_offloading=true --set trainer_cls=training.dpo.LoftDPOTrainer
# Target 3's speed half where both fit: the 12 GB recipe with Loft's DPO trainer (no gc.collect/empty_cache per
# micro-batch, training/dpo.py) against TRL's DPOTrainer at 1,024.
bench t3-qwen7b-dpo-1024-loft-trainer $Q/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 3 --vs baseline \
  --cap-gib 12 --set gradient_accumulation_steps=2 --set trainer_cls=training.dpo.LoftDPOTrainer

# Target 4: 24,576 overflowed in one layer's MLP with offloading alone; tiled_mlp computes it in sequence shards.
LONG=(--cap-gib 12 --data full --warmup 1 --steps 2 "${LIGER[@]}" --set liger_fused_linear_cross_entropy=true
      --set sample_packing=true --set micro_batch_size=1 --set gradient_accumulation_steps=1 --set lora_dropout=0
      --set activation_offloading=true --set tiled_mlp=true --set embeddings_skip_upcast=true)
bench t4-llama8b-qlora-24k-tiled-cap12 $L/qlora-conservative-24gb.yaml "${LONG[@]}" --set sequence_len=24576
bench t4-llama8b-qlora-32k-tiled-cap12 $L/qlora-conservative-24gb.yaml "${LONG[@]}" --set sequence_len=32768
