"""What every check of `loft doctor` writes into: findings with a stable code, a severity, the reason and the fix,
each pointing at the recipe line it is about; findings the recipe silences with `# loft-doctor: ignore CODE` are
kept apart."""

import re
from dataclasses import dataclass
from pathlib import Path

SEVERITIES = ("error", "warning", "note")


@dataclass
class Finding:
    code: str
    severity: str
    reason: str
    fix: str
    where: str = ""


class Report:
    def __init__(self, recipe: Path, text: str = ""):
        self.recipe = recipe
        self.findings: list[Finding] = []
        self.lines = key_lines(text)
        self.ignored = set(re.findall(r"#\s*loft-doctor:\s*ignore\s+([A-Z0-9, -]+)", text))
        self.ignored = {c.strip() for group in self.ignored for c in re.split(r"[ ,]+", group) if c.strip()}
        self.suppressed: list[Finding] = []
        self.memory: dict | None = None
        self.data: dict = {}

    def add(self, code: str, severity: str, reason: str, fix: str, key: str | None = None, where: str = ""):
        if key is not None and not where:
            where = self.where(key)
        finding = Finding(code, severity, reason, fix, where or str(self.recipe))
        (self.suppressed if code in self.ignored else self.findings).append(finding)

    def where(self, key: str) -> str:
        line = self.lines.get(key) or self.lines.get(key.split(".")[0].split("[")[0])
        return f"{self.recipe}:{line}" if line else str(self.recipe)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def exit_code(self, strict: bool) -> int:
        return 2 if self.count("error") else 1 if strict and self.count("warning") else 0


def key_lines(text: str) -> dict[str, int]:
    """'learning_rate' -> 31, 'datasets[0]' -> 20, 'datasets[0].path' -> 20: where each key sits in the file."""
    import yaml

    try:
        root = yaml.compose(text)
    except Exception:  # the YAML error itself is reported by load()
        return {}
    out = {}
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            name = str(key.value)
            out.setdefault(name, key.start_mark.line + 1)
            if isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    out[f"{name}[{i}]"] = item.start_mark.line + 1
                    if isinstance(item, yaml.MappingNode):
                        for k, _ in item.value:
                            out[f"{name}[{i}].{k.value}"] = k.start_mark.line + 1
    return out
