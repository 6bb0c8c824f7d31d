"""LoRA adapters served beside their base, unmerged: `loft serve MODEL --adapter NAME=DIR` (repeatable).

Before any server starts, each adapter is checked against the base it is served on, from the safetensors
headers alone (no weights read): every lora_A must take the base module's input width and every lora_B give its
output width, so an adapter trained on another model is one clear line instead of a server crash.

vLLM takes the PEFT folders as they are (--lora-modules NAME=DIR). llama-server takes GGUF LoRA files: each
adapter is converted once with the llama.cpp tree's own convert_lora_to_gguf.py (f32: adapters are small and
the conversion then adds no rounding), cached in $LOFT_CACHE/lora-gguf/ by the adapter's and base's identity.
A GGUF carries no HF config, so for llama.cpp the adapter's recorded base (adapter_config.json's
base_model_name_or_path, a local folder or a cached hub id) is the HF model checked against, and the GGUF's
own dimensions are checked against that base's config.
"""

import hashlib
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

from training import llama_cpp, process
from training.errors import LoftError
from training.paths import RunDir, cache_dir

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


def parse(specs: list[str] | None) -> dict[str, Path]:
    """['NAME=DIR' or 'DIR', ...] -> {name: resolved dir}; a bare DIR is named after its folder
    (runs/<run>/adapter -> <run>)."""
    adapters = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            folder = Path(spec).expanduser().resolve()
            name = folder.parent.name if folder.name == RunDir.ADAPTER else folder.name
        folder = Path(path).expanduser().resolve()
        if not NAME.match(name):
            raise LoftError(f"--adapter {spec}: the name {name!r} must be letters, digits, '.', '_' or '-'")
        if name in adapters:
            raise LoftError(f"--adapter {spec}: the name {name} is given twice; name them NAME=DIR")
        if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
            raise LoftError(f"--adapter {spec}: {folder} is not a PEFT LoRA folder "
                            "(adapter_config.json and adapter_model.safetensors); pass e.g. runs/<run>/adapter")
        cfg = json.loads((folder / "adapter_config.json").read_text())
        if cfg.get("peft_type") != "LORA":
            raise LoftError(f"--adapter {spec}: {folder} is a {cfg.get('peft_type')} adapter; servers load LoRA only")
        adapters[name] = folder
    return adapters


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header (8-byte length, then JSON): no tensor data is read."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def model_shapes(model_dir: Path) -> dict[str, list[int]]:
    shapes = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        shapes.update(safetensors_shapes(shard))
    return shapes


def check_matches(name: str, adapter_dir: Path, base_dir: Path, base_shapes: dict | None = None) -> None:
    """Raise a LoftError unless every LoRA matrix of the adapter fits the base module it adapts."""
    base_shapes = base_shapes if base_shapes is not None else model_shapes(base_dir)
    for key, shape in safetensors_shapes(adapter_dir / "adapter_model.safetensors").items():
        match = LORA_KEY.match(key)
        if not match:
            continue  # modules_to_save copies, biases: the server that loads them judges those
        module, part = match.groups()
        weight = base_shapes.get(module + ".weight")
        if weight is None:
            raise LoftError(f"adapter {name} ({adapter_dir}) adapts {module}, which {base_dir.name} does not have: "
                            "it was trained on another model; serve it on its own base")
        # Linear: W is out×in, A is r×in, B is out×r. Embedding: W is vocab×hidden, A is r×vocab, B is hidden×r.
        out_dim, in_dim = weight[::-1] if "embedding" in part else weight
        want, got = (in_dim, shape[1]) if part.endswith("A") else (out_dim, shape[0])
        if want != got:
            raise LoftError(f"adapter {name} ({adapter_dir}) does not match {base_dir.name}: {module} is "
                            f"{weight[0]}×{weight[1]} there but the adapter's {part} has shape {shape}; "
                            "serve it on the base it was trained on")


def recorded_base(name: str, adapter_dir: Path) -> Path:
    """The HF folder the adapter was trained on, from adapter_config.json (a local path or a cached hub id)."""
    from training.merging.sources import locate

    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    found = locate(recorded) if recorded else None
    if found is None:
        raise LoftError(f"adapter {name}: its base {recorded or '(not recorded)'} is not on this machine, and "
                        "llama.cpp needs the base's config.json to convert it; fix base_model_name_or_path in "
                        f"{adapter_dir / 'adapter_config.json'}")
    return found


def check_gguf_base(name: str, gguf: Path, base_dir: Path) -> None:
    """The GGUF must have the HF base's width and depth, or the adapter cannot apply to it."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    conf = json.loads((base_dir / "config.json").read_text())
    for gguf_key, hf_key in (("embedding_length", "hidden_size"), ("block_count", "num_hidden_layers")):
        field = fields.get(f"{arch}.{gguf_key}")
        have = int(field.parts[-1][0]) if field else None
        if have != conf.get(hf_key):
            raise LoftError(f"adapter {name} was trained on {base_dir.name} ({hf_key} {conf.get(hf_key)}), but "
                            f"{gguf.name} has {gguf_key} {have}: serve the adapter on a GGUF of its base")


def gguf_lora(name: str, adapter_dir: Path, base_dir: Path) -> Path:
    """The adapter as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py), converted once and cached."""
    h = hashlib.sha256()
    for f in (adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors", base_dir / "config.json"):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    out = cache_dir() / "lora-gguf" / h.hexdigest()[:24] / f"{name}-f32.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    cmd = [sys.executable, str(llama_cpp.lora_convert_script()), str(adapter_dir), "--base", str(base_dir),
           "--outfile", str(tmp), "--outtype", "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=llama_cpp.converter_env())
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        print(process.tail(proc.stdout + proc.stderr, 15), file=sys.stderr)
        raise LoftError(f"convert_lora_to_gguf.py failed on adapter {name} ({adapter_dir}); its last lines are above")
    tmp.rename(out)
    return out


def for_llama_cpp(gguf: Path, adapters: dict[str, Path]) -> list[Path]:
    """GGUF LoRA files for llama-server, in the order of `adapters` (llama-server's adapter ids 0, 1, ...)."""
    files = []
    for name, folder in adapters.items():
        base = recorded_base(name, folder)
        check_matches(name, folder, base)
        check_gguf_base(name, gguf, base)
        files.append(gguf_lora(name, folder, base))
    return files
