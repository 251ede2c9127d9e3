"""Log output: readable lines for people, or one JSON object per line for machines."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Set on records of state changes (meshshard.events): which peer, under which plan epoch.
FIELDS = ("node", "epoch", "kind")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in FIELDS:
            if hasattr(record, field):
                out[field] = getattr(record, field)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so a progress bar that redirects it keeps log
    lines above the bar instead of through it."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


# Third-party noise on every model load once torchao is installed (transformers imports it):
# its CUDA-only kernels fail to load on a CPU, and torch warns of its enum types.
QUIET = ("torchao", "torch.utils._pytree")


def setup_logging(level: str, fmt: str) -> None:
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
