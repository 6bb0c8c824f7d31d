"""`loft` — one verb, one module. Each module defines HELP, EXAMPLE, add_arguments(parser) and run(args).

Verb modules keep heavy imports (torch, axolotl) inside run(), so `loft --help` and `loft doctor` start fast.
"""

import argparse
import sys

from training import data, model, doctor, train, merge, export, serve, demo
from training.errors import guarded
from training.paths import apply_private_env
from benchmarks import bench, report

VERBS = {
    "model": model,  # embedded default model -> HF dir
    "data": data,  # Shakespeare (or your writing) -> chat JSONL
    "doctor": doctor,  # schema, data, lints and GPU memory, before a run
    "train": train,  # doctor, then Axolotl training with the health guard
    "merge": merge,  # PEFT merge onto the full-precision base + fidelity check
    "export": export,  # llama.cpp GGUF conversion and quantization
    "serve": serve,  # llama-server / vLLM behind an OpenAI-compatible API
    "bench": bench,  # style transfer and other benchmarks
    "report": report,  # runs/<name>/report.md from saved results
    "demo": demo,  # the whole pipeline on the embedded default
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loft", description="Fine-tune, merge, export, serve and benchmark.")
    parser.add_argument("--online", action="store_true", help="allow Hugging Face Hub access (off by default)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, module in VERBS.items():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=f"example: {module.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_private_env(online=args.online)
    return guarded(f"loft {args.verb}", args._run, args)


if __name__ == "__main__":
    sys.exit(main())
