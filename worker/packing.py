"""Compact vectors on the wire: the embeddings of a ``semcache.write_entries`` task as one base64 matrix.

A write command that carries its vector (a miss of ``get_or_generate`` hands over its query vector) used to travel
as a JSON list of 384 floats: about 8 KB of decimal text per command, and formatting and parsing those floats was
the biggest CPU cost of a write after the embedding itself (about 190 us per command in the sender and 80 us in the
worker; docs/performance.md, "Writes"). :func:`pack_embeddings` moves the vectors of a batch out of the commands
into one ``embeddings`` keyword argument, ``{"dtype", "dim", "rows", "data"}``: ``data`` is the base64 of the
little-endian matrix, ``rows`` says which command each row belongs to. The worker puts each row back into its
command (:func:`unpack_embeddings`) before the usual validation, so nothing downstream changes.

Lossless: the matrix is float32 only when every value is exactly a float32 (what the embedders return), else
float64 (a caller's own vectors). A batch whose vectors differ in length is sent as before, unpacked.

>>> import base64
>>> cmds = [{"prompt": "a", "embedding": [0.5, -0.25]}, {"prompt": "b", "embedding": None}]
>>> slim, packed = pack_embeddings(cmds)
>>> slim, packed["dtype"], packed["rows"], len(base64.b64decode(packed["data"]))
([{'prompt': 'a'}, {'prompt': 'b', 'embedding': None}], 'float32', [0], 8)
>>> unpack_embeddings(slim, packed)[0]
{'prompt': 'a', 'embedding': [0.5, -0.25]}
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cache_core.errors import InvalidInput

__all__ = ["PackedEmbeddings", "pack_embeddings", "unpack_embeddings"]

_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


class PackedEmbeddings(BaseModel):
    """The ``embeddings`` keyword argument of ``semcache.write_entries``."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "float64"]
    dim: int = Field(..., ge=1, le=8192)
    rows: list[int] = Field(..., min_length=1, max_length=1000, description="The command of each row, in order.")
    data: str = Field(..., description="base64 of the little-endian rows x dim matrix.")


def pack_embeddings(commands: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The commands without their vectors, and the vectors as one :class:`PackedEmbeddings` dict.

    Returns the commands unchanged and ``None`` when there is nothing to pack (no vectors, or vectors of several
    lengths: the worker reports those per command, as before).
    """
    rows = [i for i, c in enumerate(commands) if c.get("embedding") is not None]
    if not rows:
        return list(commands), None
    vectors = [commands[i]["embedding"] for i in rows]
    if len({len(v) for v in vectors}) != 1 or not vectors[0]:
        return list(commands), None
    exact = np.asarray(vectors, dtype=np.float64)
    narrow = exact.astype(np.float32)
    matrix = narrow if np.array_equal(narrow.astype(np.float64), exact) else exact
    dtype = "float32" if matrix.dtype == np.float32 else "float64"
    data = base64.b64encode(matrix.astype(_DTYPES[dtype], copy=False).tobytes()).decode("ascii")
    packed = set(rows)
    slim = [{k: v for k, v in c.items() if k != "embedding"} if i in packed else c for i, c in enumerate(commands)]
    return slim, {"dtype": dtype, "dim": int(matrix.shape[1]), "rows": rows, "data": data}


def unpack_embeddings(commands: list[Any], raw: Any) -> list[Any]:
    """The commands with their vectors put back (new dicts; the task's arguments stay as they came).

    Raises :class:`InvalidInput` when ``raw`` is malformed: not the model, bad base64, a size that does not match
    ``rows`` x ``dim``, a row that is not a command's position, or a command that carries a vector of its own too.
    """
    try:
        packed = PackedEmbeddings.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"invalid embeddings: {exc.errors(include_input=False)[0]['msg'][:200]}") from None
    try:
        blob = base64.b64decode(packed.data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("invalid embeddings: data is not base64") from None
    dtype = _DTYPES[packed.dtype]
    if len(blob) != len(packed.rows) * packed.dim * dtype.itemsize:
        raise InvalidInput(f"invalid embeddings: {len(blob)} bytes for {len(packed.rows)} rows of {packed.dim} "
                           f"{packed.dtype}")
    if len(set(packed.rows)) != len(packed.rows) or not all(0 <= i < len(commands) for i in packed.rows):
        raise InvalidInput("invalid embeddings: rows must be distinct positions of commands")
    # tolist(): Python floats with exactly the packed values (float32 widens to float64 without rounding)
    matrix = np.frombuffer(blob, dtype=dtype).reshape(len(packed.rows), packed.dim).tolist()
    out = list(commands)
    for i, vector in zip(packed.rows, matrix):
        command = out[i]
        if not isinstance(command, dict):
            continue  # reported as an invalid command by the usual validation
        if command.get("embedding") is not None:
            raise InvalidInput(f"invalid embeddings: command #{i} carries its own embedding too")
        out[i] = {**command, "embedding": vector}
    return out
