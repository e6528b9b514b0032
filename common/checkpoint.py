"""Checkpoints that a long run can be resumed from: written atomically, verified when read, refused when foreign.

    save_checkpoint(path, state, identity)        # state: anything torch.save takes (state_dicts, counters, ...)
    state = load_checkpoint(path, identity)       # SystemExit with a clear message when it does not fit
    rng = rng_state(); set_rng_state(rng)         # Python, NumPy, torch (CPU and every CUDA device)
    packed = pack_array(images); images = unpack_array(packed)   # zlib-compressed arrays (uint8 frames shrink 5-20x)

A checkpoint file is a header (magic, payload length, SHA-256 of the payload) followed by the torch.save payload. It
is written to a temporary file in the same directory, flushed to disk and renamed over the old one (`os.replace` is
atomic), so a crash while saving leaves the previous checkpoint intact; a file cut short or altered on disk fails the
length or hash check and is never loaded. `identity` is a small dict (script, env id, network sizes, ...) stored with
the state: `load_checkpoint` refuses a checkpoint whose identity differs and says which entries differ.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

MAGIC = b"SAFERL-CHECKPOINT-1\n"
CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    """Every random generator a run draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pack_array(array: np.ndarray, level: int = 1) -> dict:
    """A numpy array as zlib-compressed bytes (level 1: fast; pixel frames still shrink several times)."""
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": array.shape, "data": zlib.compress(array.tobytes(), level)}


def unpack_array(packed: dict) -> np.ndarray:
    return np.frombuffer(zlib.decompress(packed["data"]), dtype=np.dtype(packed["dtype"])).reshape(packed["shape"])


def save_checkpoint(path: str | os.PathLike, state: dict, identity: dict) -> int:
    """Write {"identity": identity, "state": state} atomically to `path`. Returns the file's size in bytes."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"identity": identity, "state": state}, buffer)
    payload = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest())
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: readers see the old checkpoint or the new one, never a partial file
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)  # make the rename itself durable
        os.close(fd)
    except OSError:
        pass
    return len(payload) + len(MAGIC) + 40


def load_checkpoint(path: str | os.PathLike, identity: dict | None = None, map_location="cpu") -> dict:
    """The state saved by `save_checkpoint`, after checking the file is whole and (if given) the identity matches."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path} (a run directory written with --checkpoint-every holds "
                         f"{CHECKPOINT_NAME})")
    with open(path, "rb") as f:
        header = f.read(len(MAGIC) + 40)
        payload = f.read()
    if not header.startswith(MAGIC) or len(header) < len(MAGIC) + 40:
        raise SystemExit(f"error: {path} is not a checkpoint of this repository (unknown header)")
    (length,) = struct.unpack("<Q", header[len(MAGIC):len(MAGIC) + 8])
    digest = header[len(MAGIC) + 8:]
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        raise SystemExit(f"error: the checkpoint {path} is truncated or corrupt ({len(payload)} of {length} payload "
                         "bytes, or a hash mismatch); it was not loaded")
    saved = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    if identity is not None:
        check_identity(saved["identity"], identity, path)
    return saved["state"]


def check_identity(saved: dict, current: dict, path) -> None:
    """Refuse a checkpoint of another script, env id or incompatible sizes, naming what differs."""
    if saved.get("script") != current.get("script"):
        raise SystemExit(f"error: {path} was written by {saved.get('script')!r}, not by {current.get('script')!r}")
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in sorted(set(saved) | set(current))
              if saved.get(k) != current.get(k)]
    if differ:
        raise SystemExit(f"error: the checkpoint {path} does not fit this run ({'; '.join(differ)}). Resume with the "
                         "flags of the run that wrote it.")
