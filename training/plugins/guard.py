"""Health guard: an Axolotl plugin that stops a run that is burning GPU hours without learning.

A recipe enables it by listing it (Axolotl imports plugins by path, so it works under a plain
`accelerate launch -m axolotl.cli.train recipe.yaml` run from the repo root):

    plugins:
      - training.plugins.guard.HealthGuardPlugin

It watches every log line the Trainer emits and stops the run (`control.should_training_stop`) on:

    G001  non-finite loss or grad norm                        at once
    G002  grad norm ≈ 0 for K logged steps in a row           nothing reaches the trainable weights
    G003  loss not lower by a set fraction after a set share   not learning (or diverging), judged with
          of the steps (and after warmup)                     the step-to-step noise, so a noisy run passes
    G004  learning rate ≈ 0 before most of the run is done    the schedule starved the run
    G005  eval loss above its best for P evals in a row       overfitting; the best checkpoint is kept
          while train loss keeps falling                      when load_best_model_at_end is on

The diagnosis (causes and fixes) goes to the console and to <output_dir>/health.json; a clean run writes
health.json with status "ok". On a CUDA device health.json also records peak memory: the process's, training's and
loading's, as training/plugins/peak.py measures them (`loft doctor --measure` reads it). Thresholds are recipe keys
(HealthGuardArgs below), all optional.
"""

import json
import math
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from transformers import TrainerCallback

from axolotl.integrations.base import BasePlugin

from training.paths import RunDir
from training.plugins.peak import PROBE, local_device


class HealthGuardArgs(BaseModel):
    """Recipe keys of the health guard (Axolotl merges them into its config schema)."""

    loft_guard: bool | None = Field(default=True, description="false: plugin listed but the guard does nothing")
    loft_guard_action: str | None = Field(default="stop", description="stop | warn (diagnose, keep training)")
    loft_guard_grad_zero_norm: float | None = Field(default=1e-8, description="grad norm at or below this is zero")
    loft_guard_grad_zero_steps: int | None = Field(default=3, description="zero grad norm on this many logs in a row")
    loft_guard_plateau_share: float | None = Field(default=0.1, description="judge learning after this share of steps")
    loft_guard_min_improvement: float | None = Field(default=0.01, description="loss must fall by this fraction; 0 = off")
    loft_guard_lr_floor: float | None = Field(default=0.05, description="LR below this fraction of learning_rate is ≈ 0")
    loft_guard_lr_collapse_before: float | None = Field(default=0.5, description="…when it happens before this share")
    loft_guard_overfit_patience: int | None = Field(default=3, description="evals in a row above the best eval loss")


DEFAULTS = HealthGuardArgs().model_dump()


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean(xs):
    return sum(xs) / len(xs)


class HealthGuardCallback(TrainerCallback):
    def __init__(self, settings: dict, learning_rate: float, output_dir: str):
        self.s = {k: (settings.get(k) if settings.get(k) is not None else v) for k, v in DEFAULTS.items()}
        self.peak_lr = learning_rate
        self.output_dir = Path(output_dir)
        self.losses: list[float] = []  # train loss per log
        self.evals: list[tuple[int, float, float]] = []  # (step, eval loss, train loss at that time)
        self.zero_grads = 0
        self.problem: dict | None = None
        self.warmup_steps = 0
        self.max_steps = 0

    # ---- Trainer hooks
    def on_train_begin(self, args, state, control, **kwargs):
        self.max_steps = state.max_steps or args.max_steps or 0
        try:
            self.warmup_steps = args.get_warmup_steps(self.max_steps) if self.max_steps > 0 else 0
        except Exception:  # older/newer TrainingArguments
            self.warmup_steps = int(getattr(args, "warmup_steps", 0) or 0)
        try:
            PROBE.start_training()
        except Exception:  # memory bookkeeping must never break training
            pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.s["loft_guard"] or self.problem or not logs:
            return
        step = state.global_step
        try:
            if "eval_loss" in logs:
                self._check_eval(step, logs["eval_loss"])
            elif "loss" in logs:
                self._check_train(step, logs)
        except Exception as err:  # a guard bug must never cost the run it guards
            print(f"loft guard: disabled after an internal error ({type(err).__name__}: {err})", flush=True)
            self.s["loft_guard"] = False
            return
        if self.problem:
            self._report(args, state)
            if self.s["loft_guard_action"] != "warn":
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._report(args, state, announce=False)  # final step count and peak memory

    # ---- checks
    def _check_train(self, step, logs):
        loss, grad, lr = logs.get("loss"), logs.get("grad_norm"), logs.get("learning_rate")
        if not _finite(loss) or (grad is not None and not _finite(grad)):
            bad = "loss" if not _finite(loss) else "grad norm"
            return self._fail("G001", step, f"{bad} is {loss if bad == 'loss' else grad} at step {step}", [
                "learning rate too high: lower learning_rate (10× is a good first step)",
                "fp16 overflow: use bf16: true on Ampere or newer GPUs, or keep fp16 with a lower learning_rate",
                "the checkpoint already holds inf/NaN (e.g. a bf16 model converted to fp16: |w| > 65504 → inf)",
                "a corrupt row (empty conversation, every label masked): run `loft doctor` on the recipe",
            ], ["learning_rate ÷ 10", "bf16: true, fp16: false", "max_grad_norm: 1.0",
                "reload the base in its published dtype (bf16)"])
        self.losses.append(float(loss))

        if grad is not None and grad <= self.s["loft_guard_grad_zero_norm"]:
            self.zero_grads += 1
            if self.zero_grads >= self.s["loft_guard_grad_zero_steps"]:
                return self._fail("G002", step, f"grad norm ≤ {self.s['loft_guard_grad_zero_norm']:g} for "
                                  f"{self.zero_grads} logged steps in a row (last {grad:g})", [
                    "no trainable parameter is on the loss path: lora_target_modules names modules the model "
                    "does not use, or the adapter is frozen",
                    "lora_dropout: 1.0 zeroes every adapter input",
                    "every label is masked (-100): roles_to_train / train_on_inputs leave nothing to learn",
                ], ["lora_target_linear: true", "lora_dropout: 0.05", "roles_to_train: [assistant]"])
        else:
            self.zero_grads = 0

        progress = step / self.max_steps if self.max_steps else 0.0
        share, before = self.s["loft_guard_plateau_share"], self.s["loft_guard_lr_collapse_before"]
        if _finite(lr) and self.peak_lr and share <= progress < before:
            floor = self.s["loft_guard_lr_floor"] * self.peak_lr
            endless_warmup = self.warmup_steps > before * self.max_steps  # e.g. warmup_steps: 1000 on a 60-step run
            if lr <= floor and (step > self.warmup_steps or endless_warmup):
                return self._fail("G004", step, f"learning rate {lr:.3g} at step {step} of {self.max_steps} is "
                                  f"≤ {self.s['loft_guard_lr_floor']:g} × learning_rate ({self.peak_lr:g}) with "
                                  f"{100 * (1 - progress):.0f}% of the run left", [
                    "the scheduler's horizon is shorter than the run (num_epochs vs max_steps)",
                    "warmup longer than the run, or a decay that reaches 0 early (cosine_min_lr_ratio, one_cycle)",
                ], ["lr_scheduler: cosine with max_steps = the real run length",
                    f"warmup_steps: {max(1, self.max_steps // 20)} (5% of this run) or warmup_ratio: 0.05"])
        if self.peak_lr == 0:
            return self._fail("G004", step, "learning_rate is 0: the weights never change", [
                "learning_rate: 0 in the recipe or an override"], ["learning_rate: 2e-4 (QLoRA) / 1e-4 (LoRA)"])

        need = self.s["loft_guard_min_improvement"]
        if need and self.max_steps and progress >= share and step >= self.warmup_steps and len(self.losses) >= 4:
            self._check_plateau(step, need)

    def _check_plateau(self, step, need):
        """First w logs vs the last w: stop only when even the optimistic bound shows < `need` improvement."""
        w = min(max(2, len(self.losses) // 2), 20)
        first, last = self.losses[:w], self.losses[-w:]
        spread = _mean([(x - _mean(first)) ** 2 for x in first] + [(x - _mean(last)) ** 2 for x in last]) ** 0.5
        gain = _mean(first) - _mean(last)
        optimistic = gain + 2 * spread * math.sqrt(2 / w)
        if optimistic >= need * abs(_mean(first)):
            return
        if gain < -2 * spread * math.sqrt(2 / w):
            self._fail("G003", step, f"loss rose from {_mean(first):.4g} to {_mean(last):.4g} over the first "
                       f"{100 * step / self.max_steps:.0f}% of the run", [
                "learning rate too high for this model and batch", "no warmup on a large learning rate",
            ], ["learning_rate ÷ 3", "warmup_ratio: 0.05", "max_grad_norm: 1.0"])
        else:
            self._fail("G003", step, f"loss {_mean(first):.4g} → {_mean(last):.4g} after {step} of "
                       f"{self.max_steps} steps: less than {100 * need:g}% better (noise ±{spread:.2g})", [
                "learning rate too low to move the weights (e.g. 1e-7)",
                "adapter too small or on the wrong modules", "the data is already predicted as well as it can be",
            ], ["learning_rate: 2e-4 (QLoRA) / 1e-4 (LoRA)", "lora_target_linear: true",
                "loft_guard_min_improvement: 0 to turn this check off"])

    def _check_eval(self, step, eval_loss):
        if not _finite(eval_loss):
            return self._fail("G001", step, f"eval loss is {eval_loss} at step {step}", [
                "the model diverged (see train loss)", "an eval row with every label masked"],
                ["learning_rate ÷ 10", "run `loft doctor` on the recipe"])
        train = _mean(self.losses[-3:]) if self.losses else None
        self.evals.append((step, float(eval_loss), train))
        best_i = min(range(len(self.evals)), key=lambda k: self.evals[k][1])
        since = len(self.evals) - 1 - best_i
        patience = self.s["loft_guard_overfit_patience"]
        if patience and since >= patience:
            best_step, best, best_train = self.evals[best_i]
            rising = all(self.evals[k][1] < self.evals[k + 1][1] or self.evals[k + 1][1] > best
                         for k in range(best_i, len(self.evals) - 1))
            if rising and train is not None and best_train is not None and train < best_train:
                self._fail("G005", step, f"eval loss {best:.4g} at step {best_step} rose to {eval_loss:.4g} over "
                           f"{since} evals while train loss fell {best_train:.4g} → {train:.4g}: overfitting", [
                    "too many epochs over a small dataset", "learning rate or adapter rank too high for the data",
                ], ["max_steps = the best step", "more rows, or fewer epochs",
                    "load_best_model_at_end: true, metric_for_best_model: eval_loss, save_strategy: steps, "
                    "save_steps = eval_steps (keeps the best checkpoint)"])
                self.problem["best_step"] = best_step

    # ---- outcome
    def _fail(self, code, step, reason, causes, fixes):
        self.problem = {"code": code, "step": step, "reason": reason, "causes": causes, "fixes": fixes}

    def _memory(self) -> dict | None:
        """Peak memory as training.plugins.peak measures it (the process, training, loading), on a CUDA device."""
        try:
            if not torch.cuda.is_available():
                return None
            return {"device": torch.cuda.get_device_name(local_device()), **PROBE.record()}
        except Exception:  # memory bookkeeping must never break training
            return None

    def _report(self, args, state, announce: bool = True):
        if not state.is_world_process_zero:
            return
        out = {"status": "stopped" if self.problem and self.s["loft_guard_action"] != "warn" else
               "warned" if self.problem else "ok",
               "step": state.global_step, "max_steps": self.max_steps, "problem": self.problem,
               "losses": self.losses[-50:], "evals": [{"step": s, "eval_loss": e} for s, e, _ in self.evals],
               "memory": self._memory(), "settings": self.s}
        if self.problem and self.problem["code"] == "G005":
            out["best_checkpoint"] = (state.best_model_checkpoint if args.load_best_model_at_end else None)
            out["note"] = ("the best checkpoint is loaded at the end" if args.load_best_model_at_end else
                           "load_best_model_at_end is off: the saved adapter is the last, overfit one; "
                           f"retrain with max_steps: {self.problem['best_step']}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / RunDir.HEALTH).write_text(json.dumps(out, indent=2))
        if self.problem and announce:
            p = self.problem
            verb = "stopping the run" if out["status"] == "stopped" else "continuing (loft_guard_action: warn)"
            lines = [f"loft guard: {p['code']} at step {p['step']}: {p['reason']} — {verb}", "  likely causes:"]
            lines += [f"    - {c}" for c in p["causes"]] + ["  try:"] + [f"    - {f}" for f in p["fixes"]]
            if out.get("note"):
                lines.append(f"  note: {out['note']}")
            lines.append(f"  written to {self.output_dir / RunDir.HEALTH}")
            print("\n".join(lines), flush=True)


class HealthGuardPlugin(BasePlugin):
    """`plugins: [training.plugins.guard.HealthGuardPlugin]` in a recipe."""

    def get_input_args(self) -> str:
        return "training.plugins.guard.HealthGuardArgs"

    def register(self, cfg):
        try:  # before the model loads, so that loading's peak survives Axolotl's resets too
            PROBE.watch()
        except Exception:  # memory bookkeeping must never break training
            pass

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        settings = {k: cfg.get(k) for k in DEFAULTS}
        lr = cfg.get("learning_rate")
        lr = float(lr) if isinstance(lr, (int, float, str)) and str(lr).strip() else 0.0
        return [HealthGuardCallback(settings, lr, trainer.args.output_dir)]
