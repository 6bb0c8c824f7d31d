"""Code that Axolotl itself loads, by a dotted path written in a recipe's YAML, and runs inside its own process.

    plugins:
      - training.plugins.guard.HealthGuardPlugin      # stops a run that is not learning; writes health.json
    trainer_cls: training.plugins.dpo.LoftDPOTrainer  # DPO with the LM head in chunks

These dotted paths are a public API: recipes (Loft's and anyone's copied from them) name them, and a plain
`accelerate launch -m axolotl.cli.train recipe.yaml` imports them, so renaming a module or class here breaks
every recipe that names it. Everything here runs inside Axolotl's training process, not inside `loft`: an error
must not cost the run (the guard disables itself rather than raise; every speed or memory lever goes through
`lever` below), and nothing here may import a `loft` verb.

  guard.py      HealthGuardPlugin: the health guard (every recipe lists it; `loft train` adds it)
  dpo.py        LoftDPOTrainer: Axolotl's DPO trainer without per-step cache flushing, LM head in chunks,
                activation_offloading honoured, the reference pass switched on the layers' own flags
  dpo_kernels.py  Axolotl's fused LoRA kernels on LoftDPOTrainer's model, once TRL has wrapped it in PEFT
  dpo_logps.py  LoftDPOTrainer's sequence log-probs: completion tokens only, in chunks, the frozen head's gradient
                taken in the forward
  cce.py        CutCrossEntropyPlugin: the loss through Apple's cut-cross-entropy kernel (a measured lever)
  padding.py    ContinuedPaddingPlugin: one-document packed rows on cuDNN's attention (in the full-row recipes)
  lean.py       LeanStepPlugin: fewer host stalls a step: the Trainer's bookkeeping without model walks, a packed
                batch's documents read once (in the 12 GB, long, bf16 SFT and DPO recipes)
  rope.py       FusedRopePlugin: Liger's fused RoPE inside the attention Axolotl rewrites for its LoRA kernels
  tiled_mlp.py  TiledMLPPlugin: each MLP over a long row in 8,192-token pieces (in the long recipe)
  long_attention.py  LongAttentionPlugin: rows over 49,152 tokens attend once per K/V head, half SDPA's backward
                memory (in the long recipe)
  embedding_offload.py  EmbeddingOffloadPlugin: the frozen input embedding in CPU RAM (in the long recipe)
  cpu_ranks.py  CPURanksPlugin: `loft train --gpus N` on a machine without GPUs (added by loft train)
  peak.py       the one peak-memory probe: what the guard and `loft bench speed` call the measured peak
"""


def lever(name: str, apply, said=str, failed: str = "left off"):
    """Apply a speed or memory lever: returns what apply() returned, and prints `loft NAME: said(result)` when that
    is something. A lever must never cost the run: an error prints `loft NAME: FAILED (error)` and returns None."""
    try:
        result = apply()
    except Exception as err:
        print(f"loft {name}: {failed} ({type(err).__name__}: {err})", flush=True)
        return None
    if result:
        print(f"loft {name}: {said(result)}", flush=True)
    return result
