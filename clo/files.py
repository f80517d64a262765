"""Files the app writes and reads back: one atomic write, one safe tensor load.

A file written here appears whole or not at all (written to a temporary name beside it,
flushed to disk, then renamed over the target), so a run killed mid-write leaves the previous
version, never a torn one. What the app saved with torch.save is read back without running
code (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from .errors import UserError


def atomic_write(path: Path, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """``write(f)`` into a temporary file beside ``path``, fsync'd, then renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_save(obj, path: Path) -> Path:
    """torch.save, atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def load_tensors(path: Path):
    """What this project wrote with torch.save (tensors and plain containers), read without running
    code: torch.load(weights_only=True). A file that needs more, such as a pickle that would import
    or call something, is refused by name before anything of it runs."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} holds more than tensors and plain containers, so loading it could run code; "
                        f"refused ({first}). Use only run folders you trust, or start a new run") from None
