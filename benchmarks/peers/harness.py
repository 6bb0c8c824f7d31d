"""How `loft bench speed --vs` runs the other runners beside Loft, and how it compares them.

Every runner gets the recipe's hyperparameters as flags (benchmarks/peers/flags.py), runs in its own process on
the same rows and model folder, and leaves one JSON record: "ok" (step marks, memory, losses, its settings and
package versions), "does_not_fit" (out of memory under the cap), "cannot_run" (with the reason: no GPU, a
package missing) or, when it wrote nothing, an error carrying the last line of its log.

Loft is compared with every peer that trained, and headlined against the strongest one: the highest tokens/s
among the peers that ran in the same invocation.
"""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.peers import KEYS, module_of
from training.axolotl import PAD_ID
from training.paths import REPO, RunDir
from training.recipe import RecipeFacts

LABELS = {"loft": "Loft", "baseline": "naive TRL", "trl": "TRL tuned", "unsloth": "Unsloth"}


def beta(cfg: dict) -> float:
    return cfg.get("rl_beta") or (cfg.get("trl") or {}).get("beta") or 0.1


def command(key: str, task: str, cfg: dict, model_dir: Path, tokenizer: Path, data: Path, out: Path,
            total_steps: int, grad_accum: int, cap_gib, profile_step, packing: bool = False) -> list[str]:
    """The recipe's hyperparameters as flags of runner `key` (results key: baseline, trl or unsloth)."""
    facts = RecipeFacts.of(cfg)
    cmd = [sys.executable, "-m", module_of(key), "--task", task, "--model", str(model_dir),
           "--tokenizer", str(tokenizer), "--data", str(data), "--out", str(out), "--seq-len", str(facts.sequence_len),
           "--micro-batch", str(cfg.get("micro_batch_size", 1)), "--grad-accum", str(grad_accum),
           "--steps", str(total_steps), "--learning-rate", str(cfg.get("learning_rate", 2e-4)),
           "--optimizer", str(cfg.get("optimizer", "adamw_torch")), "--lora-r", str(cfg.get("lora_r", 16)),
           "--lora-alpha", str(cfg.get("lora_alpha", 32)), "--lora-dropout", str(cfg.get("lora_dropout", 0.0)),
           "--beta", str(beta(cfg)), "--pad-id", str(PAD_ID)]
    if facts.bits == 4:
        cmd.append("--load-in-4bit")
    elif facts.bits == 8:
        cmd.append("--load-in-8bit")
    for flag, on in (("--gradient-checkpointing", cfg.get("gradient_checkpointing")),
                     ("--rslora", cfg.get("peft_use_rslora")), ("--tf32", cfg.get("tf32")), ("--packing", packing)):
        if on:
            cmd.append(flag)
    if cap_gib:
        cmd += ["--cap-gib", str(cap_gib)]
    if profile_step:
        cmd += ["--profile-step", str(profile_step)]
    return cmd


def grad_accum(peer_packs: bool, loft_packed: bool, ga: int, micro_batch: int, step_tokens: float,
               mean_row: float) -> int:
    """Micro-batches per optimizer step for a peer, so that it trains Loft's tokens per step: a peer that packs
    fills sequences as Loft does (same accumulation); one that does not accumulates as many rows as Loft packed."""
    if peer_packs or not loft_packed:
        return ga
    return max(1, round(step_tokens / (micro_batch * mean_row)))


def log_tail(log: Path) -> str:
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:240] if lines else ""


def read_result(path: Path, log: Path, runner: str) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    tail = log_tail(log)
    return {"runner": runner, "status": "error",
            "error": f"no measurement written ({tail}); see {log}" if tail else f"no measurement written; see {log}"}


def run(key: str, cmd: list[str], work: Path) -> dict:
    """Run one peer; its output goes to WORK/KEY/train.log, its record to the --out of its command."""
    run_dir = work / key
    run_dir.mkdir(parents=True, exist_ok=True)
    out = Path(cmd[cmd.index("--out") + 1])
    out.unlink(missing_ok=True)
    log = RunDir(run_dir).train_log
    print(f"loft bench speed: {key} ({LABELS[key]}) -> {log}", flush=True)
    with log.open("w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    return read_result(out, log, key)


# ---------------------------------------------------------------- comparison
def ratios(loft: dict, other: dict) -> dict | None:
    """Loft ÷ the other runner, when both trained."""
    if loft.get("status") != "ok" or other.get("status") != "ok":
        return None
    mem = loft.get("peak_reserved_gib"), other.get("peak_reserved_gib")
    return {"tokens_per_s": round(loft["tokens_per_s"] / other["tokens_per_s"], 2),
            "tokens_per_step": round(loft["tokens_per_step"] / other["tokens_per_step"], 2),
            "peak_reserved": round(mem[0] / mem[1], 2) if all(mem) else None,
            "peak_reserved_gib_delta": round(mem[0] - mem[1], 2) if all(mem) else None}


def strongest(results: dict) -> str | None:
    """The peer (never Loft) with the most tokens/s among those that trained."""
    ok = {k: r["tokens_per_s"] for k, r in results.items() if k != "loft" and r.get("status") == "ok"}
    return max(ok, key=ok.get) if ok else None


def versus(results: dict) -> dict:
    """{peer: Loft ÷ peer} for every peer that was asked for (None where either did not train); {} without Loft."""
    if "loft" not in results:
        return {}
    return {k: ratios(results["loft"], r) for k, r in results.items() if k != "loft" and k in KEYS}


def summary_lines(results: dict) -> list[str]:
    """Loft against each peer, the strongest marked; a peer that did not train says why in one line."""
    out = []
    best = strongest(results)
    for key, r in versus(results).items():
        label = f"{LABELS[key]}{' (strongest)' if key == best else ''}"
        if r is None:
            status = results[key].get("status")
            why = results[key].get("reason") or results[key].get("error") or ""
            out.append(f"  loft / {label}: no ratio ({key} {status}{': ' + why if why else ''})")
            continue
        out.append(f"  loft / {label}: {r['tokens_per_s']}x tokens/s, {r['tokens_per_step']}x tokens per step, "
                   f"{r['peak_reserved']}x peak reserved ({r['peak_reserved_gib_delta']:+} GiB)")
    return out
