"""What a training run leaves on disk: checkpoints, ``metrics.csv`` and ``run.json``.

Every file is written so that a run killed at any moment loses no finished file:
checkpoints and ``run.json`` atomically (:func:`atomic_write_bytes`), ``metrics.csv``
one appended row at a time and rebuilt from the checkpoint on resume
(:class:`RunDirectory`).

**Checkpoints.**
A checkpoint file is a short header followed by the bytes of ``torch.save(payload)``:

==============  ========  ===================================================
``MAGIC``       12 bytes  ``b"OTATTN-CKPT\\n"``: this is an otattn checkpoint
length          8 bytes   length of the payload in bytes (little-endian)
digest          32 bytes  SHA-256 of the payload
payload         length    ``torch.save`` of the :class:`Checkpoint`'s fields
==============  ========  ===================================================

PyTorch's own format checks neither length nor content (a flipped byte inside a tensor
loads silently), so the header makes a truncated or corrupted file an error that says
so, instead of a crash deep in ``pickle`` or a silently wrong resume.  The payload is
read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts
only, no code.

Writing is atomic (:func:`atomic_write_bytes`): the bytes go to a temporary file in the
same directory, are flushed and ``fsync``-ed, and ``os.replace`` puts the file in place
in one step, so a process killed at any moment leaves either the previous checkpoint or
the new one, never half of one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import struct
import subprocess
from dataclasses import dataclass, field

import torch

import otattn

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Checkpoint",
    "CheckpointError",
    "RunDirectory",
    "atomic_write_bytes",
    "atomic_write_text",
    "config_differences",
    "load_checkpoint",
    "provenance",
    "save_checkpoint",
]

MAGIC = b"OTATTN-CKPT\n"
# Version 1: the fields of Checkpoint below.  Bump it when they change meaning.
FORMAT_VERSION = 1
_HEADER = struct.Struct(f"<{len(MAGIC)}sQ32s")
# Bytes per write call; a crash between two calls leaves a partial temporary file.
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: not one, truncated, corrupt, or made by
    another configuration or format version."""


@dataclass
class Checkpoint:
    """Everything a training run needs to continue exactly where it stopped.

    Attributes
    ----------
    step : int
        Optimizer updates done.
    config : dict
        The run's configuration, as plain data (``dataclasses.asdict``).
    model : dict
        The model's ``state_dict`` (of the bare model, not a DDP wrapper).
    optimizer : dict
        The optimizer's ``state_dict``.
    best_eval_loss : float
        Lowest evaluation loss so far (``inf`` before the first evaluation).
    best_step : int or None
        The step that reached it.
    rng : dict
        Random-number-generator states: ``"torch"`` (CPU) and ``"cuda"`` (a list, one
        per device; empty without CUDA).
    loop : dict
        The loop's running sums (train loss since the last logged row, elapsed time).
    history : list of dict
        The rows of ``metrics.csv`` up to ``step``.
    versions : dict
        ``{"otattn": ..., "torch": ...}`` that wrote the checkpoint.
    format_version : int
        ``FORMAT_VERSION`` of the writer.
    """

    step: int
    config: dict
    model: dict
    optimizer: dict
    best_eval_loss: float = float("inf")
    best_step: int | None = None
    rng: dict = field(default_factory=dict)
    loop: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def _write_chunks(file, data: bytes) -> None:
    """Write ``data`` in chunks of ``_CHUNK`` bytes (tests interrupt it half-way)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        file.write(view[start : start + _CHUNK])


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be
    opened, e.g. on Windows)."""
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


def atomic_write_bytes(path, data: bytes) -> None:
    """Replace the file ``path`` by ``data`` atomically.

    Writes ``.NAME.tmp`` next to it, flushes and ``fsync``-s it, then ``os.replace``-s
    it onto ``path`` and ``fsync``-s the directory.  If anything fails, the temporary
    file is removed and ``path`` is untouched.  One writer per path at a time.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write_chunks(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically, with its length and SHA-256."""
    payload = {
        f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(checkpoint)
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = _HEADER.pack(MAGIC, len(body), hashlib.sha256(body).digest())
    atomic_write_bytes(path, header + body)


def load_checkpoint(path, *, map_location="cpu") -> Checkpoint:
    """Read and check the checkpoint at ``path``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointError
        The file is not an otattn checkpoint, is truncated or corrupt (length or
        SHA-256 mismatch), or has another format version.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        raise CheckpointError(
            f"{path} is not an otattn checkpoint (its first bytes are not {MAGIC!r})"
        )
    _, length, digest = _HEADER.unpack_from(data)
    body = memoryview(data)[_HEADER.size :]
    if len(body) != length:
        raise CheckpointError(
            f"{path} is truncated or padded: the header announces {length} bytes of "
            f"payload, the file holds {len(body)}"
        )
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match")
    try:
        payload = torch.load(
            io.BytesIO(body), map_location=map_location, weights_only=True
        )
    except Exception as error:  # the digest matched, so this is a foreign payload
        raise CheckpointError(f"{path} could not be unpickled: {error}") from error
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this otattn reads "
            f"version {FORMAT_VERSION}"
        )
    names = {f.name for f in dataclasses.fields(Checkpoint)}
    if set(payload) != names:
        raise CheckpointError(
            f"{path} has fields {sorted(payload)}; expected {sorted(names)}"
        )
    return Checkpoint(**payload)


def config_differences(saved: dict, current: dict, *, ignore=()) -> list[str]:
    """The fields in which two configurations (as dicts) differ, as readable lines.

    Fields named in ``ignore`` are not compared.  Each line reads
    ``"name: <saved> (checkpoint) != <current> (now)"``.
    """
    lines = []
    for name in sorted(set(saved) | set(current)):
        if name in ignore:
            continue
        old, new = saved.get(name, "<absent>"), current.get(name, "<absent>")
        if old != new:
            lines.append(f"{name}: {old!r} (checkpoint) != {new!r} (now)")
    return lines


def provenance() -> dict:
    """Versions of otattn and torch, torch's CPU thread count, and the git commit of the
    otattn source (``None`` outside a git checkout) with whether tracked files differ
    from it (``dirty``)."""
    here = pathlib.Path(otattn.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "otattn_version": otattn.__version__,
        "torch_version": str(torch.__version__),
        # CPU results are bit-reproducible for one thread count, not across them.
        "torch_threads": torch.get_num_threads(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


class RunDirectory:
    """The files of one run in ``path``: ``metrics.csv``, ``run.json``, ``last.pt``,
    ``best.pt``.

    ``metrics.csv`` has the header ``columns``; a row is appended (and flushed) as soon
    as it is measured.  A resumed run first rewrites it from its checkpoint's history,
    which drops any rows written after that checkpoint, so the file of a resumed run
    equals that of an uninterrupted one (times and speeds apart).
    """

    def __init__(self, path, columns: list[str]) -> None:
        self.path = pathlib.Path(path)
        self.columns = list(columns)

    @property
    def last(self) -> pathlib.Path:
        return self.path / "last.pt"

    @property
    def best(self) -> pathlib.Path:
        return self.path / "best.pt"

    def begin(self, history: list[dict]) -> None:
        """Create the directory and write ``metrics.csv`` with ``history``'s rows."""
        self.path.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.path / "metrics.csv", text.getvalue())

    def append(self, row: dict) -> None:
        """Append one row to ``metrics.csv``."""
        with open(self.path / "metrics.csv", "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def write_record(self, record: dict) -> None:
        """Replace ``run.json`` by ``record`` (atomically)."""
        atomic_write_text(self.path / "run.json", json.dumps(record, indent=2) + "\n")
