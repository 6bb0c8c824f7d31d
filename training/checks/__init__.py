"""The checks `loft doctor` runs, each adding findings to one Report (report.py); training/doctor.py is the verb.

  schema.py     LOFT-E0xx  the recipe file and Axolotl's own schema
  datacheck.py  LOFT-D1xx  the datasets, read the way Axolotl will read them
  lints.py      LOFT-L2xx  recipes that run but waste the run
  memory.py              the peak-memory estimator (arithmetic on the architecture, no GPU)
  fit.py        LOFT-M3xx  the estimate on a GPU profile, and the cheapest change that fits
  measure.py             `--measure`: the real peak on a GPU, next to the estimate
The multi-GPU checks (LOFT-P4xx) live with the per-GPU arithmetic in training/parallel.py. The estimator's evidence
(estimate vs every measured run) is benchmarks/calibration.py.
"""
