"""The checkpoint file: its name, the keys every checkpoint holds, the atomic write and the
checked read (a damaged file is one ``CheckpointError`` line naming the choices, not a traceback).

What goes into a checkpoint is the engine's (:meth:`zosam.engine.Trainer.state_dict`); this
module only knows the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from zosam.validate import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_KEYS = ("epoch", "global_step", "model", "optimizer", "masking", "scheduler", "scaler", "torch_rng",
                   "history", "train_time_s", "images_seen", "extra", "config")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (truncated, empty, not a checkpoint): one line
    naming the file and the choices."""


def read_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint file written by :meth:`zosam.engine.Trainer.save_checkpoint`, or raise ``CheckpointError``
    naming the file, why it is unusable and what to do (an older checkpoint beside it, or start over)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["all"]
        if missing:
            raise KeyError(f"not a zosam checkpoint (missing {', '.join(missing[:3])})")
    except Exception as e:  # torch raises EOFError, UnpicklingError, RuntimeError, ... for a damaged file
        if isinstance(e, EOFError):
            why = "the file ends early (empty or cut off)"
        elif isinstance(e, pickle.UnpicklingError):
            why = "not a torch checkpoint (unpickling failed)"
        else:
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        others = sorted(p.name for p in path.parent.glob("*.pt") if p != path) if path.parent.is_dir() else []
        older = f"resume from an older checkpoint there ({', '.join(others[:3])}: copy it to {path.name}), or " \
            if others else ""
        raise CheckpointError(f"checkpoint {path} is unreadable: {why}; {older}start over: "
                              f"delete {path} (or run without --resume, or with another name)") from None
    return ckpt


def write_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` atomically (a temporary file beside it, then a rename); returns ``path``."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)  # a run killed while saving keeps the previous checkpoint
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise
    return path
