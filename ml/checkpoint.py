"""Checkpoint files: written atomically, identified by their sha256.

A checkpoint is the dict :func:`ml.train.train_model` hands to ``checkpoint_every`` (and returns
as ``TrainResult.checkpoint``): ``format``, ``task``, ``num_classes``, ``model`` (state_dict),
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (completed), ``config``, ``history``, ``rng``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ml.models import ActiveModel, build_model

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> str:
    """Write ``state`` with ``torch.save`` to a temporary file in the target's directory, fsync
    it, then ``os.replace`` it onto ``path`` (so readers see the old file or the whole new one,
    never a partial one) and fsync the directory. Returns the sha256 hex of the written file.
    The temporary file is removed if anything fails."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp_name, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (not possible on every platform; then skipped)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Loaded with ``weights_only=True`` (tensors and plain Python values only, no arbitrary
    unpickling): the states :func:`ml.train.train_model` produces are built to allow that.
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a checkpoint dict")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> ActiveModel:
    """Rebuild the model from ``state["task"]``, ``state["num_classes"]``, ``state["model"]``;
    returned on the CPU in eval mode."""
    model = build_model(state["task"], int(state["num_classes"]))
    model.load_state_dict(state["model"])
    return model.eval()
