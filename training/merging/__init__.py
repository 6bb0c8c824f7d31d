"""The parts of `loft merge` (training/merge.py is the verb that strings them together):

  sources.py    which adapter, base, training base and recipe a merge is about (the MergeJob)
  plan.py       the shard plan: which adapter change lands on which base tensor, computed once, and the merge itself
  write.py      the merged folder, written whole or not at all, with its manifest
  verify.py     the fidelity check: the merge against the adapter in PEFT, bounded by the dtype's rounding floor
  qlora_gap.py  for QLoRA: which merge comes closest to what training saw through NF4
"""
