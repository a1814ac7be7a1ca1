"""Console and file logging for training (rank 0 only under DDP)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional


class _StderrHandler(logging.StreamHandler):
    """Console handler that writes to the *current* ``sys.stderr`` (it may be replaced, e.g. by pytest)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(save_path: Optional[str] = None, main_process: bool = True) -> None:
    root = logging.getLogger()
    if not main_process:  # under DDP only rank 0 talks
        root.setLevel(logging.ERROR)
        return
    if not any(getattr(h, "_coic", False) for h in root.handlers):
        console = _StderrHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        console._coic = True
        root.addHandler(console)
        root.setLevel(logging.INFO)
    if save_path:
        path = os.path.abspath(os.path.join(save_path, "train.log"))
        if not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            root.addHandler(handler)
