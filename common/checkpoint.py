"""Checkpoints that a long run can be resumed from: written atomically, verified when read, refused when foreign.

    save_checkpoint(path, state, identity)        # state: anything torch.save takes (state_dicts, counters, ...)
    state = load_checkpoint(path, identity)       # SystemExit with a clear message when it does not fit
    rng = rng_state(); set_rng_state(rng)         # Python, NumPy, torch (CPU and every CUDA device)
    packed = pack_array(images); images = unpack_array(packed)   # zlib-compressed arrays (uint8 frames shrink 5-20x)

A script's resume, in three calls:

    args, resumed = resume_run(args, "actsafe")        # --resume runs/<run>: the run's flags and its checkpoint
    checkpointer = Checkpointer(run_dir, args.checkpoint_every, identity)
    ... if resumed: check_identity(resumed["identity"], identity, ...); load the state; set_rng_state(...)
    ... in the loop: if checkpointer.due(global_step): checkpointer.save(global_step, {...}, args)

A checkpoint file is a header (magic, payload length, SHA-256 of the payload) followed by the torch.save payload. It
is written to a temporary file in the same directory, flushed to disk and renamed over the old one (`os.replace` is
atomic), so a crash while saving leaves the previous checkpoint intact; a file cut short or altered on disk fails the
length or hash check and is never loaded. `identity` is a small dict (script, env id, network sizes, ...) stored with
the state: `load_checkpoint` refuses a checkpoint whose identity differs and says which entries differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import signal
import struct
import sys
import time
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
    # protocol 4 writes bytes (pack_array's compressed rows) as they are; torch's default protocol 2 stores them as a
    # latin-1 string, about 1.5 times as large (measured on random bytes: 4.5 MB for 3.0 MB)
    torch.save({"identity": identity, "state": state}, buffer, pickle_protocol=4)
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
    saved = read_checkpoint(path, map_location)
    if identity is not None:
        check_identity(saved["identity"], identity, path)
    return saved["state"]


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """{"identity": ..., "state": ...} of a checkpoint file, after checking the file is whole (length and hash)."""
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
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


def check_identity(saved: dict, current: dict, path) -> None:
    """Refuse a checkpoint of another script, env id or incompatible sizes, naming what differs."""
    if saved.get("script") != current.get("script"):
        raise SystemExit(f"error: {path} was written by {saved.get('script')!r}, not by {current.get('script')!r}")
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in sorted(set(saved) | set(current))
              if saved.get(k) != current.get(k)]
    if differ:
        raise SystemExit(f"error: the checkpoint {path} does not fit this run ({'; '.join(differ)}). Resume with the "
                         "flags of the run that wrote it.")


# ---- a script's resume: the run's flags, its checkpoint, a checkpoint every N steps ----

# flags a resumed run may change: where and how often it saves, its length, how it runs, what it logs and how it is
# evaluated at the end (not what it learns)
RESUMABLE_CHANGES = ("resume", "checkpoint_every", "checkpoint_buffer", "total_timesteps", "cuda", "compile",
                     "cudagraphs", "torch_threads", "async_envs", "eval_episodes", "capture_video", "log_every",
                     "save_model")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_flags(argv: list[str], names) -> set[str]:
    """The fields named on the command line (`--env-id X`, `--env_id=X`, `--no-cuda`), defaults included."""
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name not in names and name.startswith("no_") and name[3:] in names:
            name = name[3:]
        if name in names:
            given.add(name)
    return given


def resume_run(args, script: str, may_change: tuple[str, ...] = RESUMABLE_CHANGES, argv: list[str] | None = None):
    """`(args, None)` without `args.resume`; with it, `(the run's args, {"identity", "state", "path", "run_dir"})`.

    The run's saved flags replace the defaults, so `--resume runs/<run>` alone continues the run as it was started.
    A flag given now (on the command line, `argv`, default sys.argv; or set to a value other than its default) with
    a value other than the run's is refused (it would silently make another run), except the flags in `may_change`
    (e.g. a longer `--total-timesteps`). A missing directory, a directory
    without a checkpoint, a damaged checkpoint or one written by another script: a clear SystemExit.
    """
    if not getattr(args, "resume", None):
        return args, None
    run_dir = os.path.normpath(args.resume)
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: --resume {args.resume}: no such run directory (give the directory of the run to "
                         "continue, runs/<run>)")
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume {args.resume}: no {CHECKPOINT_NAME} in it (a run writes one every "
                         "--checkpoint-every steps and at its end)")
    saved = read_checkpoint(path)
    if saved["identity"].get("script") != script:
        raise SystemExit(f"error: --resume {args.resume}: that run was written by "
                         f"{saved['identity'].get('script')}.py, not by {script}.py")
    then = saved["state"].get("args", {})
    defaults = type(args)()
    names = {f.name for f in dataclasses.fields(args)}
    given = given_flags(sys.argv[1:] if argv is None else argv, names)
    merged, refused = {}, []
    for field in dataclasses.fields(args):
        name, now, default = field.name, getattr(args, field.name), getattr(defaults, field.name)
        before = then.get(name, default)
        chosen = name in given or now != default  # typed now (even its default value), or set by the caller
        if name == "resume" or (chosen and now != before and name in may_change):
            merged[name] = now
        elif chosen and now != before:
            refused.append(f"{_flag(name)}: the run has {before!r}, given {now!r}")
        else:
            merged[name] = before
    if refused:
        raise SystemExit(f"error: --resume {args.resume}: flags differ from the run's ({'; '.join(refused)}). Omit "
                         f"them to continue the run as it was started (only "
                         f"{', '.join(_flag(n) for n in may_change if n in names and n != 'resume')} "
                         "may change).")
    return dataclasses.replace(args, **merged), {**saved, "path": path, "run_dir": run_dir}


class Checkpointer:
    """A checkpoint every `every` steps (0: only when `save` is called at the end), written atomically to
    `run_dir/checkpoint.pt`.

    checkpointer = Checkpointer(run_dir, args.checkpoint_every, identity, start_step=resumed_step)
    if checkpointer.due(global_step): checkpointer.save(global_step, state, args)

    `save` adds the step, all args (what `resume_run` restores) and every RNG state to `state`, and prints a line with
    the file's size and the time it took. Tests simulate a crash right after the n-th save with the environment
    variable SAFERL_KILL_AFTER_CHECKPOINT=n (the process kills itself with SIGKILL, as an OOM killer or a preempted
    job would).
    """

    def __init__(self, run_dir: str, every: int, identity: dict, start_step: int = 0):
        if every < 0:
            raise SystemExit(f"error: --checkpoint-every must be 0 (only at the end) or positive, got {every}")
        self.path, self.every, self.identity = os.path.join(run_dir, CHECKPOINT_NAME), every, identity
        self.next = (start_step // every + 1) * every if every else None
        self.saves = 0

    def due(self, step: int) -> bool:
        return self.next is not None and step >= self.next

    def save(self, step: int, state: dict, args=None) -> None:
        start = time.time()
        state = {**state, "step": step, "rng": rng_state()}
        if args is not None:
            state["args"] = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
        size = save_checkpoint(self.path, state, self.identity)
        if self.every:
            self.next = (step // self.every + 1) * self.every
        self.saves += 1
        print(f"checkpoint: step {step} -> {self.path} ({size / 2**20:.1f} MiB, {time.time() - start:.1f} s)",
              flush=True)
        if os.environ.get("SAFERL_KILL_AFTER_CHECKPOINT") == str(self.saves):
            os.kill(os.getpid(), signal.SIGKILL)
