"""`loft demo`: the whole pipeline on the embedded default model, on a laptop, no GPU, no hub.

  data -> train (Axolotl) -> merge (PEFT, verified) -> export (llama.cpp GGUF) -> serve (llama-server)
  -> generate base vs fine-tuned through the OpenAI API -> style score, head-to-head on math with a p-value,
  faithfulness of summaries -> runs/<name>/report.md

Every stage is also its own verb (`loft data`, `loft train`, `loft merge`, `loft export`, `loft serve`,
`loft bench style`, `loft report`); this module only strings them together and times them.
"""

import json
import time
from pathlib import Path

from training.errors import LoftError
from training.paths import MERGED, REPO, RUNS, RunDir, cache_dir

HELP = "Run the whole pipeline on the embedded SmolLM2-135M and Shakespeare; print where the report is."
EXAMPLE = "loft demo            # about 10 minutes on 2 CPU cores"

RECIPE = REPO / "recipes" / "smollm2-135m" / "lora-cpu.yaml"
DATA_ARGS = dict(name="shakespeare-mini", passage_tokens=64, max_train_rows=2000, max_eval_rows=24)
GEN = dict(max_tokens=96, temperature=0.8, top_p=0.95, seed=0)  # sampled, seeded: greedy 135M output loops
CHECKABLE = dict(max_tokens=96, temperature=0.0, seed=0)  # math and summaries: greedy, answers are checked
MATH_ITEMS = 20


def ensure_demo_data() -> Path:
    """The dataset the demo recipe names; built once (the recipe header shows the same command)."""
    from training import data

    out = RUNS / "data" / DATA_ARGS["name"]
    if not (out / "train.jsonl").exists() or not (out / "eval.jsonl").exists():
        data.build(
            data.shakespeare_sources(), "play", out, list(data.DEFAULT_HOLDOUT),
            DATA_ARGS["passage_tokens"], DATA_ARGS["max_train_rows"], DATA_ARGS["max_eval_rows"],
        )
    return out


def heldout(data_dir: Path) -> tuple[list[list[dict]], list[str]]:
    """Prompts (the conversation up to the answer) and the author's real answers, from held-out plays."""
    prompts, refs = [], []
    for line in (data_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        prompts.append(msgs[:-1])
        refs.append(msgs[-1]["content"])
    return prompts, refs


def base_gguf() -> Path:
    """The base model as F16 GGUF, exported once into the cache: the fair opponent for the fine-tune."""
    from training import export
    from training.model import NAME, ensure_default_model

    out = cache_dir() / "gguf" / NAME
    found = sorted(out.glob("*-F16.gguf")) if out.exists() else []
    if not found:
        export.export(ensure_default_model(quiet=True), out, ["f16"], ppl=False)
        found = sorted(out.glob("*-F16.gguf"))
    return found[0]


def pipeline(name: str = "demo", steps: int | None = None, resume: bool = False) -> Path:
    from benchmarks import faithfulness, generate, report, style, versus
    from training import export, merge, train
    from training.model import ensure_default_model
    from training.serve import llama_server

    run = RunDir.named(name)
    timings = {}

    def stage(label: str):
        print(f"\n=== loft demo: {label}", flush=True)
        timings[label] = time.time()

    stage("model + data")
    ensure_default_model()
    data_dir = ensure_demo_data()
    prompts, refs = heldout(data_dir)

    stage("train")
    if resume and (run.adapter / "adapter_model.safetensors").exists():
        print(f"loft demo: --resume: keeping the adapter in {run.adapter}")
    else:
        overrides = [f"max_steps={steps}"] if steps else []
        train.train(RECIPE, name=name, overrides=overrides)

    stage("merge")
    merged = MERGED / f"smollm2-135m-{name}"
    merge_report = merge.merge(run.adapter, merged, dtype="bf16", force=True, eval_path=data_dir / "eval.jsonl")
    run.merge_json.write_text(json.dumps(merge_report, indent=2))

    stage("export")
    heldout_text = run.heldout
    heldout_text.write_text("\n\n".join(refs), encoding="utf-8")
    export_report = export.export(merged, run.gguf, ["f16", "q8_0", "q5_k_m", "q4_k_m"], eval_text=heldout_text)
    run.export_json.write_text(json.dumps(export_report, indent=2))
    tuned = next(Path(f["path"]) for f in export_report["files"] if f["quant"] == "f16")

    stage("serve + generate")
    math_items, sources = versus.math_problems(MATH_ITEMS, seed=0), faithfulness.load_sources()
    outputs, math_out, summaries = {}, {}, {}
    for label, gguf in (("base", base_gguf()), ("fine-tuned", tuned)):
        with llama_server(gguf) as url:
            outputs[label] = generate.openai_chat(url, prompts, model=gguf.stem, identity=gguf, **GEN)
            math_out[label] = generate.openai_chat(url, versus.prompts_for("math", math_items), model=gguf.stem,
                                                   identity=gguf, **CHECKABLE)
            summaries[label] = generate.openai_chat(url, faithfulness.prompts(sources), model=gguf.stem,
                                                    identity=gguf, **CHECKABLE)

    stage("head-to-head + faithfulness")
    math = versus.head_to_head("math", math_items, math_out, "fine-tuned", "base")
    run.versus_json.write_text(json.dumps({"tasks": {"math": math}, "seed": 0}, indent=2))
    run.faithfulness_json.write_text(
        json.dumps(faithfulness.faithfulness_report(sources, summaries), indent=2))

    stage("style benchmark")
    result = style.style_report(refs, outputs, baseline="base")
    result["samples"] = [
        {"prompt": p[-1]["content"], "base": b, "fine-tuned": f, "reference": r}
        for p, b, f, r in list(zip(prompts, outputs["base"], outputs["fine-tuned"], refs))[:4]
    ]
    run.style_json.write_text(json.dumps(result, indent=2))

    stage("report")
    path = report.render(run.path)
    timings["end"] = time.time()
    labels = list(timings)
    run.pipeline_json.write_text(json.dumps(
        {a: round(timings[b] - timings[a], 1) for a, b in zip(labels, labels[1:])}, indent=2))
    return path


def add_arguments(parser) -> None:
    parser.add_argument("--name", default="demo", help="run name: results go to runs/NAME (default demo)")
    parser.add_argument("--steps", type=int, help="override the recipe's max_steps (default: the recipe's 40)")
    parser.add_argument("--resume", action="store_true", help="keep an adapter already trained in runs/NAME")


def run(args) -> int:
    from training import llama_cpp
    from training.recipe import check_run_name

    if args.steps is not None and args.steps < 1:
        raise LoftError("--steps must be at least 1")
    check_run_name(args.name)
    llama_cpp.llama_cpp_dir()  # the export and serve stages need it: say so now, not after training
    path = pipeline(args.name, args.steps, args.resume)
    print(f"\nloft demo: report -> {path}")
    return 0
