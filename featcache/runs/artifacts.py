"""Saving and loading fitted heads safely: nothing pickled is ever written or read.

A saved head is two files in a run directory:

- ``head.safetensors``: the head's numeric arrays (``get_state()[0]``), written with
  ``safetensors.numpy`` (dtypes kept);
- ``head.json``: ``{"format": "featcache-head", "version": 1, "head": <registered name>,
  "state": <get_state()[1]>, **meta}``.

Both are written to a temporary file in the same directory and moved into place with
``os.replace``, so a reader never sees half a file. :func:`load_head` checks the JSON schema and
the safetensors header before reading any array, refuses run directories that hold
pickle-capable head files (``head.pkl``, ``head.npz``, ``head.pt``, ...), and rebuilds the head
through the ``HEADS`` registry's ``from_state``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save

from ..errors import ConfigError, HeadError
from ..common.files import write_bytes, write_text
from ..heads import HEADS
from ..heads.base import BaseHead, to_jsonable

HEAD_JSON = "head.json"
HEAD_TENSORS = "head.safetensors"
FORMAT = "featcache-head"
VERSION = 1

_RESERVED = ("format", "version", "head", "state")
#: Suffixes of head files that can carry pickled code; their presence makes a run dir suspect.
_UNSAFE_SUFFIXES = frozenset(
    {".pkl", ".pickle", ".joblib", ".dill", ".npz", ".npy", ".pt", ".pth", ".ckpt", ".bin", ".sav"}
)
_MAX_JSON_BYTES = 64 * 1024 * 1024
_MAX_HEADER_BYTES = 100 * 1000 * 1000
#: safetensors dtype -> (numpy dtype, item size); only dtypes numpy reads natively.
_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F16": ("float16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
}
_NUMPY_OK = frozenset(np.dtype(v[0]) for v in _DTYPES.values())

_REFIT = "Re-fit and save the head ('featcache fit ...')."


def _check_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, arr in arrays.items():
        if not isinstance(key, str) or not key:
            raise HeadError(f"Head state array names must be non-empty strings; got {key!r}.")
        arr = np.asarray(arr)
        if arr.dtype not in _NUMPY_OK:
            raise HeadError(
                f"Head state array '{key}' has dtype {arr.dtype}, which safetensors cannot hold "
                "without pickling. Heads must keep labels and options in the JSON metadata."
            )
        out[key] = np.ascontiguousarray(arr)
    return out


def save_head(
    run_dir: str | os.PathLike[str], head: BaseHead, *, head_name: str, meta: Mapping[str, Any]
) -> None:
    """Write a fitted head to ``run_dir/head.safetensors`` and ``run_dir/head.json``.

    Parameters
    ----------
    run_dir : path
        Created if missing; existing head files are replaced atomically.
    head : BaseHead
        A fitted head of the registered class ``head_name``.
    head_name : str
        Its registry name ("logreg", "linear", ...).
    meta : mapping
        Extra JSON-able entries stored at the top level of ``head.json`` (e.g. the cache
        fingerprint, the chosen grid value, metrics). Numpy scalars and arrays are converted.

    Raises
    ------
    ConfigError
        For an unknown ``head_name`` or a ``meta`` key reserved by the format.
    HeadError
        When the head is unfitted, of another class, or its state or ``meta`` cannot be stored.
    """
    cls = HEADS.get(head_name)
    if not isinstance(head, cls):
        raise HeadError(
            f"head_name is '{head_name}' ({cls.__name__}) but the head is a "
            f"{type(head).__name__}. Pass the name the head was made with."
        )
    clash = [k for k in meta if k in _RESERVED]
    if clash:
        raise ConfigError(
            f"meta must not set {', '.join(repr(k) for k in clash)}: these head.json keys are "
            "written by save_head. Rename them."
        )
    arrays, state = head.get_state()
    arrays = _check_arrays(arrays)
    doc = {"format": FORMAT, "version": VERSION, "head": head_name, "state": state}
    doc.update(to_jsonable(dict(meta)))
    try:
        text = json.dumps(doc, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise HeadError(
            f"The head metadata cannot be written as JSON ({exc}). Pass plain numbers, strings, "
            "lists and dicts in meta, without NaN or infinity."
        ) from None

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(run_dir / HEAD_TENSORS, save(arrays, metadata={"format": FORMAT}))
    write_text(run_dir / HEAD_JSON, text + "\n")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _read_json(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > _MAX_JSON_BYTES:
        raise HeadError(f"{path} is {size} bytes, too big for a head description. {_REFIT}")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeadError(f"{path} is not valid JSON ({exc}). {_REFIT}") from None
    if not isinstance(doc, dict):
        raise HeadError(f"{path} must hold a JSON object; got a {type(doc).__name__}. {_REFIT}")
    if doc.get("format") != FORMAT:
        raise HeadError(
            f"{path} is not a featcache head (its 'format' is {doc.get('format')!r}, expected "
            f"{FORMAT!r}). {_REFIT}"
        )
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise HeadError(f"{path} has no integer 'version'. {_REFIT}")
    if version != VERSION:
        raise HeadError(
            f"{path} has format version {version}; this featcache reads version {VERSION}. "
            "Upgrade featcache or re-fit the head."
        )
    name = doc.get("head")
    if not isinstance(name, str) or name not in HEADS:
        raise HeadError(
            f"{path} names the head {name!r}, which is not registered. Run 'featcache heads' to "
            f"list the heads, or {_REFIT[0].lower()}{_REFIT[1:]}"
        )
    if not isinstance(doc.get("state"), dict):
        raise HeadError(f"{path} lacks its 'state' object. {_REFIT}")
    return doc


def _check_safetensors_header(path: Path) -> set[str]:
    """Validate the header of a safetensors file before any array is read; return its keys."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise HeadError(f"{path} is too short to be a safetensors file. {_REFIT}")
        n = int.from_bytes(prefix, "little")
        if n < 2 or n > _MAX_HEADER_BYTES or n > size - 8:
            raise HeadError(
                f"{path} is not a safetensors file (its header length {n} does not fit the "
                f"{size}-byte file). It may be a pickle or another format: featcache only loads "
                f"safetensors. {_REFIT}"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise HeadError(f"{path} has a malformed safetensors header. {_REFIT}") from None
    if not isinstance(header, dict):
        raise HeadError(f"{path} has a malformed safetensors header (not an object). {_REFIT}")
    data_size = size - 8 - n
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise HeadError(f"{path} was not written by featcache (no '{FORMAT}' metadata). {_REFIT}")
    spans = []
    for key, info in header.items():
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in _DTYPES
            and isinstance(info.get("shape"), list)
            and all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in info["shape"]
            )
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
        )
        if not ok:
            raise HeadError(
                f"{path}: the header entry for '{key}' is malformed or has a dtype featcache does "
                f"not read. {_REFIT}"
            )
        begin, end = info["data_offsets"]
        nbytes = math.prod(info["shape"]) * _DTYPES[info["dtype"]][1]
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise HeadError(
                f"{path}: the header entry for '{key}' does not match the data (offsets "
                f"{begin}..{end}, {nbytes} bytes expected, {data_size} bytes of data). The file "
                f"is corrupt or was tampered with. {_REFIT}"
            )
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise HeadError(f"{path}: the arrays overlap or leave gaps in the data. {_REFIT}")
        position = end
    if position != data_size:
        raise HeadError(
            f"{path}: {data_size - position} trailing bytes follow the arrays. {_REFIT}"
        )
    return set(header)


def load_head(run_dir: str | os.PathLike[str]) -> tuple[BaseHead, dict[str, Any]]:
    """Load a head saved by :func:`save_head`.

    Only ``head.json`` (parsed as JSON) and ``head.safetensors`` (header checked, then read by
    safetensors) are opened; pickle, ``np.load`` and ``torch.load`` are never used.

    Parameters
    ----------
    run_dir : path

    Returns
    -------
    head : BaseHead
        The fitted head, predicting as the saved one did.
    meta : dict
        ``head.json`` without its ``state``: ``format``, ``version``, ``head`` and the ``meta``
        given to :func:`save_head`.

    Raises
    ------
    HeadError
        Naming the file, when the directory or a file is missing or malformed, when the run dir
        holds a pickle-capable head file (``head.pkl``, ``head.npz``, ...), or when the saved
        state does not describe a fitted head.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HeadError(
            f"The run directory {run_dir} does not exist. Fit a head first ('featcache fit ...')."
        )
    unsafe = sorted(
        p.name
        for p in run_dir.iterdir()
        if p.name.lower().startswith("head.") and p.suffix.lower() in _UNSAFE_SUFFIXES
    )
    if unsafe:
        raise HeadError(
            f"{run_dir} holds {', '.join(unsafe)}: a pickle-capable file featcache never writes "
            "and never loads. Delete it (do not open it: it can run code) and load again, or "
            f"re-fit the head into a fresh run directory."
        )
    json_path, tensor_path = run_dir / HEAD_JSON, run_dir / HEAD_TENSORS
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise HeadError(f"{path} is missing: {run_dir} holds no complete saved head. {_REFIT}")
    doc = _read_json(json_path)
    keys = _check_safetensors_header(tensor_path)
    try:
        arrays = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError
        raise HeadError(f"{tensor_path} cannot be read ({exc}). {_REFIT}") from None
    if set(arrays) != keys:
        raise HeadError(f"{tensor_path} changed while it was read. Load it again.")

    name = doc["head"]
    try:
        head = HEADS.get(name).from_state(arrays, doc["state"])
        expected = set(head.get_state()[0])
    except (HeadError, ConfigError, ValueError, TypeError, KeyError) as exc:
        raise HeadError(
            f"{json_path} and {tensor_path} do not describe a fitted '{name}' head: {exc}"
        ) from None
    if set(arrays) != expected:
        extra = sorted(set(arrays) - expected)
        raise HeadError(
            f"{tensor_path} holds unexpected array(s) {', '.join(extra)} for a '{name}' head. "
            f"{_REFIT}"
        )
    return head, {k: v for k, v in doc.items() if k != "state"}


__all__ = ["FORMAT", "HEAD_JSON", "HEAD_TENSORS", "VERSION", "load_head", "save_head"]
