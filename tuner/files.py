"""Find the models in a folder: plain GGUF files and complete split GGUFs (``-00001-of-0000N``), each once.

A split model is named by its first part, which is also what llama.cpp and ``tuner.gguf.read_model`` open;
the other parts are found beside it.
"""

from __future__ import annotations

from pathlib import Path

from tuner.errors import GGUFError
from tuner.gguf import SPLIT_NAME


def gguf_files(folder: Path) -> list[Path]:
    """Every model in ``folder``, sorted: plain *.gguf files and the first part of each split GGUF.

    Raises GGUFError naming the missing parts of an incomplete split model.
    """
    if not folder.is_dir():
        return []
    models: list[Path] = []
    for path in sorted(folder.glob("*.gguf")):
        match = SPLIT_NAME.match(path.name)
        if match is None:
            models.append(path)
            continue
        if int(match["no"]) != 1:
            continue
        total = int(match["count"])
        missing = [
            f"{match['prefix']}-{i:05d}-of-{total:05d}.gguf"
            for i in range(2, total + 1)
            if not (folder / f"{match['prefix']}-{i:05d}-of-{total:05d}.gguf").is_file()
        ]
        if missing:
            raise GGUFError(f"split model {path.name} is incomplete: {', '.join(missing)} missing in {folder}/")
        models.append(path)
    return models


def model_alias(path: Path) -> str:
    """The name clients use: the file name without .gguf (and without -00001-of-0000N for split files)."""
    match = SPLIT_NAME.match(path.name)
    return match["prefix"] if match else path.name.removesuffix(".gguf")
