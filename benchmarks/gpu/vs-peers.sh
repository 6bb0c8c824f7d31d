#!/usr/bin/env bash
# GPU host (one H200): Loft against TRL tuned as its docs advise and against Unsloth, same rows, LoRA (r16/α32,
# seven projections, dropout 0), tokens per step and memory cap, on the five cases of benchmarks/RESULTS.md
# ("Against TRL and Unsloth"); then Loft's untried levers as --set overrides of the recipes, 20 steps each so
# their losses can be set beside the unchanged recipe's on the same rows.
# Run from the repo root with the wheelhouse of fetch-wheels-slim.sh --unsloth carried as .whl. CASES picks the
# groups of one device call (results land in $OUT/NAME.json as each finishes):
#   CASES=qwen-full bash benchmarks/gpu/vs-peers.sh
# A 7-8B runner takes ~1.5 minutes (loading and quantizing included), so a three-runner case is ~5 minutes and one
# group per call is the safe size. Groups, in priority order: qwen-full, qwen-packed, llama-bf16, qwen-dpo,
# unchanged-qwen, unchanged-llama, unchanged-dpo, long-unsloth, long-unsloth-tiled, long-loft, long-trl, levers-qwen-a, levers-qwen-b, levers-llama,
# levers-host-llama, levers-host-qwen, levers-lean-llama, levers-lean-qwen;
# smoke (every runner on a tiny random model, SFT and DPO, ~3 minutes) catches a broken runner cheaply.
export LOFT_GPU_DEADLINE_AT="${LOFT_GPU_DEADLINE_AT:-$(( $(date +%s) + 420 ))}"  # no run starts after 7 minutes
export RUN_TIMEOUT="${RUN_TIMEOUT:-500}"  # one bench, all its runners: a hang cannot eat the call
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
CASES="${CASES:-qwen-full}"
Q=recipes/qwen2.5-7b
L=recipes/llama-3.1-8b
PEERS=(--vs "trl,unsloth")
TIMED=(--warmup 2 --steps 18)  # 20 losses per runner: Loft's set beside the unchanged recipe's (unchanged-*)
LEVER=(--only loft --warmup 2 --steps 18)  # 20 losses per lever, the loss-curve check
want() { [[ " $CASES " == *" $1 "* ]]; }

if want smoke; then
  bench vs-smoke-tiny-sft $Q/qlora-sft-12gb.yaml --arch tiny --set sequence_len=1024 --warmup 1 --steps 2 \
    --vs trl,unsloth,naive
  bench vs-smoke-tiny-dpo $Q/dpo-qlora-12gb.yaml --arch tiny --data full --set sequence_len=512 --warmup 1 \
    --steps 2 --vs trl,unsloth,naive
fi

# Qwen2.5-7B QLoRA under a 12 GiB cap: the 12 GB recipe (packing into 8,192, Liger, fused LoRA kernels,
# checkpointing), LoRA dropout 0 for every runner; full-length rows (nothing to pack), then Shakespeare-shaped.
Q12=("$Q/qlora-sft-12gb.yaml" --cap-gib 12 --set lora_dropout=0)
# --profile: one extra, untimed step per runner under torch.profiler (top kernels in each record): where Loft loses.
want qwen-full && bench vs-qwen7b-qlora-12gb-full "${Q12[@]}" --data full "${TIMED[@]}" "${PEERS[@]}" --profile
want qwen-packed && bench vs-qwen7b-qlora-12gb-packed "${Q12[@]}" "${TIMED[@]}" "${PEERS[@]}"

# Llama-3.1-8B bf16 LoRA, 2 x 4,096 full-length rows per step, no checkpointing, under the recipe's 80 GB card.
B80=("$L/lora-bf16-80gb.yaml" --data full --cap-gib 80 --set gradient_accumulation_steps=1)
want llama-bf16 && bench vs-llama8b-lora-bf16-full "${B80[@]}" "${TIMED[@]}" "${PEERS[@]}" --profile

# Qwen2.5-7B DPO QLoRA, full-length 2,048-token pairs, 2 pairs per step, under 11 GiB. Unsloth with its opt-in
# chunked preference loss (UNSLOTH_FUSED_PREFERENCE_LOSS=1, recorded in its settings): its strongest DPO.
DPO=("$Q/dpo-qlora-12gb.yaml" --data full --cap-gib 11 --set gradient_accumulation_steps=2)
if want qwen-dpo; then
  export UNSLOTH_FUSED_PREFERENCE_LOSS=1
  bench vs-qwen7b-dpo-2048-cap11 "${DPO[@]}" "${TIMED[@]}" "${PEERS[@]}" --profile
  unset UNSLOTH_FUSED_PREFERENCE_LOSS
fi

# Llama-3.1-8B QLoRA, the long recipe, one full document per step under 12 GiB: each runner's longest, lengths
# rising until one does not fit. Loft must reach 1.25x Unsloth's longest (on an H200, 2026-11-30: 36,864 as it
# is, 53,248 with its tiled MLP). A 7-8B Unsloth run at these lengths needs more than 150 s (loading included):
# keep RUN_TIMEOUT at its default.
read -ra LADDER <<< "${LENGTHS:-49152 61440}"  # the tiled ladders' lengths (LENGTHS="53248 57344" for a second call)
# each tool's own rungs in one call, where their longest lie far apart (2026-12-01: Loft 73,728, Unsloth 53,248):
#   UNSLOTH_LENGTHS="53248 57344" LOFT_LENGTHS="73728 77824" CASES="long-unsloth-tiled long-loft"
read -ra UNSLOTH_LADDER <<< "${UNSLOTH_LENGTHS:-${LADDER[*]}}"
read -ra LOFT_LADDER <<< "${LOFT_LENGTHS:-${LADDER[*]}}"
longest() {  # TAG names the runs when one runner is measured twice (Unsloth with its tiled MLP)
  local runner="$1" n name; shift
  for n in "$@"; do
    name="vs-llama8b-long-${TAG:-$runner}-$n"
    bench "$name" $L/qlora-long-12gb.yaml --only "$runner" --data full --cap-gib 12 --warmup 1 --steps 2 \
      --set sequence_len="$n" --set gradient_accumulation_steps=1
    [[ $(field "$name" "$runner" status) == ok ]] || break
  done
}
want long-unsloth && longest unsloth 28672 32768 36864 40960
# Unsloth's own tiled MLP (UNSLOTH_TILED_MLP=arctic, what from_pretrained(unsloth_tiled_mlp=True) sets; recorded in
# its settings), beside Loft's tiled MLP plugin in the recipe: each tool's longest with that lever
if want long-unsloth-tiled; then
  export UNSLOTH_TILED_MLP=arctic
  TAG=unsloth-tiled longest unsloth "${UNSLOTH_LADDER[@]}"
  unset UNSLOTH_TILED_MLP
fi
want long-trl && longest trl 12288 16384 20480
want long-loft && longest loft "${LOFT_LADDER[@]}"

# Loft's levers where it lost (full-length rows), Loft alone, 20 steps, against the unchanged recipe on the same
# rows. Cut cross-entropy through Loft's plugin (training/plugins/cce.py): Axolotl's own needs its git fork of the
# package.
lever() { local name="$1"; shift; bench "lever-$name" "$@" "${LEVER[@]}"; }
CCE=(--set "plugins=[axolotl.integrations.liger.LigerPlugin, training.plugins.cce.CutCrossEntropyPlugin]"
     --set liger_fused_linear_cross_entropy=false)
QF=("${Q12[@]}" --data full)
if want levers-qwen-a; then
  lever qwen-full-recipe "${QF[@]}"
  lever qwen-full-selective-ckpt "${QF[@]}" --set selective_checkpointing=true  # keep attention, recompute the rest
  lever qwen-full-reentrant "${QF[@]}" --set gradient_checkpointing_kwargs.use_reentrant=true
fi
if want levers-qwen-b; then
  lever qwen-full-cce "${QF[@]}" "${CCE[@]}"
  lever qwen-full-kernels-off "${QF[@]}" --set lora_mlp_kernel=false --set lora_qkv_kernel=false \
    --set lora_o_kernel=false
  lever qwen-full-offload "${QF[@]}" --set gradient_checkpointing=offload  # TRL's offloader instead of recompute
  lever qwen-full-compile "${QF[@]}" --set torch_compile=true
fi
# Measured 2026-11-30 (the lever-*-cudnn-repeat*, -compile runs): repeating K/V with cuDNN first in SDPA's order
# (the plugin of commit 76419ce) changed neither the kernel nor the speed: Axolotl's packed rows never reach SDPA's
# dispatcher, they go to varlen_attn. Full-length rows count as packed because Axolotl pads them with positions
# that restart at 0: training/plugins/padding.py, now in both recipes, continues them, so a one-document row takes
# plain causal SDPA (cuDNN); --profile shows the kernel that ran.
# The recipes as they were before the padding lever, hidden_states offloading and the DPO trainer's LoRA kernels
# went in: Loft alone, 20 steps on the same rows, so the first 20 losses of each case can be set beside the
# shipped recipe's (a lever that changes the loss curve does not count). The allocator default (expandable
# segments, training/launcher.py) is the launcher's, in both.
LIGER_ONLY=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]")
want unchanged-qwen && lever qwen-full-unchanged "${QF[@]}" "${LIGER_ONLY[@]}" --set activation_offloading=null \
  --set torch_compile=false
want unchanged-llama && lever llama-bf16-unchanged "${B80[@]}" "${LIGER_ONLY[@]}" --set torch_compile=false
want unchanged-dpo && LOFT_DPO_LORA_KERNELS=0 lever qwen-dpo-unchanged "${DPO[@]}"
# Where the host sets the pace: on full-length rows Loft's device work matched Unsloth's (Llama bf16: 544 vs 537 ms
# busy per step) but the device sat idle 66-78 ms per step waiting for the host, Unsloth's 5 ms (timeline of the
# profiled steps, 2026-11-30). Loft alone, 6 steps and a profiled one with its whole trace (LOFT_SPEED_TRACE=1),
# the recipe and three levers that cut host work: compiled, Axolotl's LoRA kernels off, Liger's norm and RoPE off.
HOST=(--only loft --warmup 2 --steps 4 --profile)
if want levers-host-llama; then
  LOFT_SPEED_TRACE=1 bench host-llama-bf16-recipe "${B80[@]}" "${HOST[@]}"
  bench host-llama-bf16-compile "${B80[@]}" "${HOST[@]}" --set torch_compile=true
  bench host-llama-bf16-kernels-off "${B80[@]}" "${HOST[@]}" --set lora_mlp_kernel=false \
    --set lora_qkv_kernel=false --set lora_o_kernel=false
  bench host-llama-bf16-liger-off "${B80[@]}" "${HOST[@]}" --set liger_rms_norm=false --set liger_rope=false
fi
if want levers-host-qwen; then
  LOFT_SPEED_TRACE=1 bench host-qwen-full-recipe "${QF[@]}" "${HOST[@]}"
  bench host-qwen-full-compile "${QF[@]}" "${HOST[@]}" --set torch_compile=true
  bench host-qwen-full-kernels-off "${QF[@]}" "${HOST[@]}" --set lora_mlp_kernel=false \
    --set lora_qkv_kernel=false --set lora_o_kernel=false
fi
# training/plugins/lean.py: the Trainer's per-step model walks and its loss NaN check, gone (same rows, 6 steps).
LEAN=(--set "plugins=[axolotl.integrations.liger.LigerPlugin, training.plugins.padding.ContinuedPaddingPlugin, training.plugins.lean.LeanStepPlugin]")
# And with it, compiled as well (both host levers together).
if want levers-lean-llama; then
  bench host-llama-bf16-lean "${B80[@]}" "${HOST[@]}" "${LEAN[@]}"
  bench host-llama-bf16-lean-compile "${B80[@]}" "${HOST[@]}" "${LEAN[@]}" --set torch_compile=true
fi
if want levers-lean-qwen; then
  bench host-qwen-full-lean "${QF[@]}" "${HOST[@]}" "${LEAN[@]}"
  bench host-qwen-full-lean-compile "${QF[@]}" "${HOST[@]}" "${LEAN[@]}" --set torch_compile=true
fi
if want levers-llama; then
  lever llama-bf16-recipe "${B80[@]}"
  lever llama-bf16-cce "${B80[@]}" "${CCE[@]}"
  lever llama-bf16-kernels-off "${B80[@]}" --set lora_mlp_kernel=false --set lora_qkv_kernel=false \
    --set lora_o_kernel=false
  lever llama-bf16-compile "${B80[@]}" --set torch_compile=true
fi
