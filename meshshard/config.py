"""One Config for a MeshShard process; every field can also come from a MESHSHARD_* variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16", "float16")


def default_cache_dir() -> Path:
    """MESHSHARD_CACHE, else $XDG_CACHE_HOME/meshshard, else ~/.cache/meshshard."""
    if env := os.environ.get("MESHSHARD_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "meshshard"


@dataclass(frozen=True)
class Config:
    # The embedded default, a local Hugging Face folder, or a hub id (where the hub is reachable).
    model: str = DEFAULT_MODEL
    # Weights and activations; float32 keeps sharded output exactly equal to the whole model.
    dtype: str = "float32"
    # Converted models live here; safe to delete, it is rebuilt on the next load.
    cache_dir: Path = field(default_factory=default_cache_dir)
