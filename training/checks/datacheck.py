"""The data half of `loft doctor`: every dataset file a recipe names, read the way Axolotl will read it.

For each local JSON/JSONL dataset: the file exists; every line parses (line numbers reported); chat rows have a
non-empty conversation with known roles in a sane order and something to train on; the chat template renders
every row; token lengths against sequence_len (rows Axolotl will drop or truncate); and, on a couple of rows,
Axolotl's own chat_template prompt strategy is run to check that the loss really is on the answer only. DPO rows
need a prompt, a chosen and a rejected answer. Tokenizer: the base model's, when it is on disk; otherwise the
embedded SmolLM2 one (counts then differ by tokenizer, and a note says so).
"""

import json
import re
from pathlib import Path

from training.paths import REPO
from training.recipe import RecipeFacts

ROLES = {"system", "user", "assistant", "tool", "developer", "ipython", "function"}
SHOW = 5  # line numbers listed per problem


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:SHOW])
    return f"line{'s' if len(numbers) > 1 else ''} {shown}" + (f" (+{len(numbers) - SHOW} more)" if len(numbers) > SHOW else "")


def resolve(path: str) -> Path | None:
    for root in (Path.cwd(), REPO):
        p = Path(path).expanduser()
        p = p if p.is_absolute() else root / p
        if p.exists():
            return p
    return None


def read_rows(path: Path) -> tuple[list[tuple[int, object]], list[tuple[int, str]]]:
    """[(line, row)], [(line, error)] for a .jsonl file, a .json array, or a folder of them."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    rows, errors = [], []
    for file in files:
        raw = file.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
            bad = text[: text.index("\ufffd")].count("\n") + 1
            errors.append((bad, "not UTF-8 text"))
        if text.lstrip().startswith("["):  # a JSON array
            try:
                data = json.loads(text)
                rows += [(i + 1, r) for i, r in enumerate(data)] if isinstance(data, list) else [(1, data)]
            except json.JSONDecodeError as err:
                errors.append((err.lineno, err.msg))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                errors.append((n, f"{err.msg} at column {err.colno}"))
    return rows, errors


# ---------------------------------------------------------------- tokenizer
def load_tokenizer(cfg: dict, report):
    from transformers import AutoTokenizer

    name = cfg.get("tokenizer_config") or cfg.get("base_model")
    if isinstance(name, str) and name:
        local = resolve(name)
        try:
            return AutoTokenizer.from_pretrained(str(local or name), local_files_only=True), None
        except Exception:
            pass
    from training.model import ensure_default_model

    fallback = ensure_default_model(quiet=True)
    report.add("LOFT-D108", "note", f"the tokenizer of `{name}` is not on this machine: token counts and the "
               "template check use the embedded SmolLM2 tokenizer, so lengths are approximate (±20%)",
               "run the doctor where the base model is downloaded for exact counts", key="base_model")
    return AutoTokenizer.from_pretrained(fallback), "SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- chat rows
def conversation_problems(row, ds: dict, train_roles: set[str]) -> tuple[str | None, str | None]:
    """(error, warning) for one chat row."""
    field = ds.get("field_messages") or "messages"
    maps = ds.get("message_property_mappings") or {}
    role_key, content_key = maps.get("role", "role"), maps.get("content", "content")
    alias = {a: r for r, names in (ds.get("roles") or {}).items() for a in (names or [])}
    if not isinstance(row, dict):
        return f"a row is a JSON object, got {type(row).__name__}", None
    msgs = row.get(field)
    if not isinstance(msgs, list):
        return f"no `{field}` list", None
    if not msgs:
        return "empty conversation", None
    roles = []
    for m in msgs:
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            return f"a message without `{role_key}`/`{content_key}`", None
        role = alias.get(m[role_key], m[role_key])
        if role not in ROLES:
            return f"unknown role {m[role_key]!r}", None
        if not isinstance(m[content_key], (str, list)):
            return f"{role} content is {type(m[content_key]).__name__}, not text", None
        roles.append(role)
    if not any(r in train_roles for r in roles):
        return f"no {'/'.join(sorted(train_roles))} turn: nothing to train on", None
    chat = [r for r in roles if r != "system"]
    if "system" in roles[1:]:
        return None, "a system message after the first turn"
    if chat and chat[0] == "assistant":
        return None, "the conversation starts with the assistant"
    if any(a == b for a, b in zip(chat, chat[1:]) if a in ("user", "assistant")):
        return None, "two user or two assistant turns in a row"
    if any(alias.get(m[role_key], m[role_key]) in train_roles and not str(m[content_key]).strip() for m in msgs):
        return None, "an empty answer"
    return None, None


def check_chat(rows, ds: dict, cfg: dict, vcfg, tok, section: str, key: str, report, stats: dict):
    train_roles = set(ds.get("roles_to_train") or ["assistant"])
    problems: dict[str, list[int]] = {}
    warnings: dict[str, list[int]] = {}
    good = []
    for line, row in rows:
        err, warn = conversation_problems(row, ds, train_roles)
        if err:
            problems.setdefault(err, []).append(line)
        else:
            if warn:
                warnings.setdefault(warn, []).append(line)
            good.append((line, row))
    for err, lines in problems.items():
        report.add("LOFT-D103", "error", f"{section}: {len(lines)} row(s) with {err} ({_lines(lines)})",
                   "fix or drop those rows: Axolotl fails on them or trains on nothing", key=key)
    for warn, lines in warnings.items():
        report.add("LOFT-D103", "warning", f"{section}: {len(lines)} row(s) with {warn} ({_lines(lines)})",
                   "many chat templates reject or mis-mask such rows; reorder or drop them", key=key)
    if not good:
        return

    template = chat_template(cfg, vcfg, ds, tok)
    field = ds.get("field_messages") or "messages"
    texts, failed = [], {}
    for line, row in good:
        msgs = normalize_messages(row[field], ds)
        try:
            texts.append(tok.apply_chat_template(msgs, chat_template=template, tokenize=False))
        except Exception as err:
            failed.setdefault(str(err).splitlines()[0][:160] or type(err).__name__, []).append(line)
    for msg, lines in failed.items():
        report.add("LOFT-D104", "error", f"{section}: the chat template fails on {len(lines)} row(s) ({_lines(lines)}): "
                   f"{msg}", "fix the rows (role order, content type) or pick another chat_template", key=key)
    if not texts:
        return
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    length_report(lengths, cfg, section, key, report, stats)
    if section.startswith("datasets") and vcfg is not None:
        check_masking(good[:2], ds, cfg, vcfg, tok, section, key, report)


def normalize_messages(msgs: list, ds: dict) -> list[dict]:
    maps = ds.get("message_property_mappings") or {}
    role_key, content_key = maps.get("role", "role"), maps.get("content", "content")
    alias = {a: r for r, names in (ds.get("roles") or {}).items() for a in (names or [])}
    return [{"role": alias.get(m[role_key], m[role_key]), "content": m[content_key]} for m in msgs]


def chat_template(cfg: dict, vcfg, ds: dict, tok) -> str | None:
    try:
        from axolotl.utils.chat_templates import get_chat_template_from_config

        return get_chat_template_from_config(cfg=vcfg if vcfg is not None else cfg, ds_cfg=ds, tokenizer=tok)
    except Exception:
        return None  # the tokenizer's own


def length_report(lengths: list[int], cfg: dict, section: str, key: str, report, stats: dict):
    seq = RecipeFacts.of(cfg).sequence_len
    ordered = sorted(lengths)
    over = sum(n > seq for n in lengths)
    pct = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    stats.setdefault("lengths", {})[section] = {"rows": len(lengths), "p50": pct(0.5), "p95": pct(0.95),
                                               "max": ordered[-1], "over_sequence_len": over}
    if section.startswith("datasets"):
        stats["mean_tokens"] = sum(lengths) / len(lengths)
    if over:
        strategy = str(cfg.get("excess_length_strategy") or "drop")
        verb = {"drop": "dropped", "truncate": "truncated", "raise": "a crash (excess_length_strategy: raise)"}.get(
            strategy, strategy)
        severity = "error" if strategy == "raise" or over > len(lengths) // 2 else "warning"
        report.add("LOFT-D105", severity, f"{section}: {over} of {len(lengths)} rows are longer than sequence_len {seq} "
                   f"(p95 {pct(0.95)}, max {ordered[-1]} tokens) and will be {verb}",
                   f"sequence_len: {pct(0.95) if pct(0.95) > seq else ordered[-1]} keeps 95%+ of rows "
                   "(memory grows with it: see the memory section), or shorten those rows", key=key)
    return over


def check_masking(rows, ds: dict, cfg: dict, vcfg, tok, section: str, key: str, report):
    """Tokenize rows with Axolotl's chat_template strategy (and its truncation); check which tokens carry loss."""
    from axolotl.prompt_strategies.chat_template import load as load_strategy

    strategy = load_strategy(tok, vcfg, dict(ds))
    train_roles = set(ds.get("roles_to_train") or ["assistant"])
    on_inputs = bool(vcfg.get("train_on_inputs"))
    seq = RecipeFacts.of(cfg).sequence_len
    truncate = str(cfg.get("excess_length_strategy") or "drop") == "truncate"
    field = ds.get("field_messages") or "messages"
    for line, row in rows:
        out = strategy.tokenize_prompt(row)
        ids, labels = out["input_ids"], out["labels"]
        if len(ids) > seq and not truncate:
            continue  # Axolotl drops this row; D105 reports it
        ids, labels = ids[:seq], labels[:seq]
        trained = [i for i, lab in zip(ids, labels) if lab != -100]
        if not trained:
            cut = " after truncation to sequence_len " + str(seq) if truncate and len(out["input_ids"]) > seq else ""
            report.add("LOFT-D106", "error", f"{section} line {line}: every token is masked{cut}, so the row trains "
                       "nothing", f"raise sequence_len above the prompt length, and check roles_to_train "
                       f"({sorted(train_roles)}) names roles in the rows", key=key)
            continue
        text = tok.decode(trained).lower()
        msgs = normalize_messages(row[field], ds)
        prompt = next((m["content"] for m in msgs if m["role"] == "user" and isinstance(m["content"], str)
                       and len(m["content"].strip()) >= 12), None)
        answer = next((m["content"] for m in msgs if m["role"] in train_roles and isinstance(m["content"], str)
                       and m["content"].strip()), None)
        probe = lambda s: s.strip()[:40].lower()  # noqa: E731
        prompt_trained = bool(prompt) and probe(prompt) in text
        if prompt_trained and on_inputs:
            report.add("LOFT-D106", "warning", f"{section} line {line}: the loss includes the prompt "
                       "(train_on_inputs: true), so the model also learns to write the user's turns",
                       "train_on_inputs: false for assistant-only loss (what chat fine-tuning wants)",
                       key="train_on_inputs")
            return
        if prompt_trained and "user" not in train_roles:
            report.add("LOFT-D106", "error", f"{section} line {line}: the loss includes the user's prompt although "
                       f"roles_to_train is {sorted(train_roles)}", "check chat_template and roles_to_train",
                       key=key)
        elif answer and probe(answer)[:20] not in text and not truncate:
            report.add("LOFT-D106", "warning", f"{section} line {line}: the trained tokens do not contain the "
                       "answer text", "check roles_to_train and that the chat template marks assistant turns",
                       key=key)


# ---------------------------------------------------------------- preference rows
def preference_fields(ds: dict) -> list[tuple[str, ...]]:
    """Each tuple: acceptable names for one required field, by Axolotl DPO type."""
    kind = str(ds.get("type") or "")
    if kind.startswith("chat_template"):
        return [(ds.get("field_messages") or "messages",), (ds.get("field_chosen") or "chosen",),
                (ds.get("field_rejected") or "rejected",)]
    if kind.endswith(".intel"):
        return [("question",), ("chosen",), ("rejected",)]
    if kind.endswith(".argilla_chat"):
        return [("chosen",), ("rejected",)]
    return [("prompt", "input", "question", "instruction"), ("chosen", "chosen_response"),
            ("rejected", "rejected_response")]


def check_preference(rows, ds: dict, cfg: dict, tok, section: str, key: str, report, stats: dict):
    needed = preference_fields(ds)
    missing: dict[str, list[int]] = {}
    same, lengths = [], []
    for line, row in rows:
        if not isinstance(row, dict):
            missing.setdefault("a JSON object", []).append(line)
            continue
        names = [next((n for n in group if n in row), None) for group in needed]
        absent = [group[0] for group, n in zip(needed, names) if n is None or row.get(n) in (None, "", [])]
        if absent:
            missing.setdefault(" and ".join(f"`{a}`" for a in absent), []).append(line)
            continue
        chosen, rejected = row[names[-2]], row[names[-1]]
        if chosen == rejected:
            same.append(line)
        prompt = row[names[0]] if len(names) == 3 else ""
        lengths.append(f"{prompt}{chosen}" if isinstance(chosen, str) else json.dumps(row, ensure_ascii=False))
    for what, lines in missing.items():
        report.add("LOFT-D107", "error", f"{section}: {len(lines)} preference row(s) lack {what} ({_lines(lines)})",
                   f"each row needs {', '.join('/'.join(g) for g in needed)} for type {ds.get('type')}", key=key)
    if same:
        report.add("LOFT-D107", "warning", f"{section}: {len(same)} row(s) whose chosen and rejected answers are "
                   f"identical ({_lines(same)}) teach nothing", "drop them or fix the pairing", key=key)
    if lengths and tok is not None:
        counts = [len(ids) for ids in tok(lengths, add_special_tokens=False)["input_ids"]]
        length_report(counts, cfg, section, key, report, stats)


# ---------------------------------------------------------------- entry point
def check(cfg: dict, vcfg, report) -> None:
    """Fill report.data with row counts and length statistics; add D1xx findings."""
    stats = report.data
    facts = RecipeFacts.of(cfg)
    rl = facts.rl if facts.preference else None
    tok = None
    summary = []
    for section in ("datasets", "test_datasets"):
        entries = cfg.get(section)
        if not isinstance(entries, list):
            continue
        for i, ds in enumerate(entries):
            name, key = f"{section}[{i}]", f"{section}[{i}]"
            if not isinstance(ds, dict) or not isinstance(ds.get("path"), str) or ds.get("type") == "_synthetic":
                continue  # the schema check reports it; synthetic rows are generated by Axolotl
            path = resolve(ds["path"])
            hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", ds["path"]) and not re.search(
                r"\.(jsonl?|parquet|csv|arrow|txt)$", ds["path"]) and not ds["path"].startswith(("runs/", "data/"))
            if path is None:
                if not hub_id:
                    report.add("LOFT-D101", "error", f"{name}: dataset file {ds['path']} does not exist",
                               "create it (e.g. `loft data shakespeare`) or fix the path; relative paths are "
                               "resolved from the repo root", key=f"{key}.path")
                else:
                    report.add("LOFT-D109", "note", f"{name}: `{ds['path']}` is a Hub dataset: not checked offline",
                               "download it to a local JSONL to have its rows checked", key=f"{key}.path")
                continue
            rows, errors = read_rows(path)
            if errors:
                report.add("LOFT-D102", "error", f"{name}: {len(errors)} line(s) of {path.name} do not parse as JSON "
                           f"({_lines([n for n, _ in errors])}; first: {errors[0][1]})",
                           "each line must be one complete JSON object; fix or delete those lines", key=key)
            if not rows:
                report.add("LOFT-D110", "error", f"{name}: {path.name} has no rows", "fill it, or remove the entry",
                           key=key)
                continue
            if section == "datasets":
                stats["train_rows"] = stats.get("train_rows", 0) + len(rows)
            kind = str(ds.get("type") or "")
            if tok is None and (rl or kind == "chat_template" or kind.startswith("chat_template")):
                tok, fallback = load_tokenizer(cfg, report)
                stats["tokenizer"] = fallback or cfg.get("base_model")
            if rl:
                check_preference(rows, ds, cfg, tok, name, key, report, stats)
            elif kind == "chat_template":
                check_chat(rows, ds, cfg, vcfg, tok, name, key, report, stats)
            summary.append(f"{name} {len(rows)} rows")
    if summary:
        lengths = stats.get("lengths", {})
        extra = [f"{k}: p50 {v['p50']}, p95 {v['p95']}, max {v['max']} tokens, {v['over_sequence_len']} over "
                 f"sequence_len" for k, v in lengths.items()]
        stats["summary"] = "; ".join(summary + extra)
