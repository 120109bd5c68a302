"""Strict safetensors reading and writing with NumPy (bf16 through ml_dtypes).

Our own reader, so that a corrupt or truncated file is reported with the file and tensor at
fault, bf16/fp16 bits pass through untouched (no float conversion anywhere), and reads are
memory-mapped (a batch of hundreds of checkpoints never holds the raw files in memory).
The writer emits the standard layout (8-byte little-endian header length, JSON header padded
with spaces to 8 bytes, contiguous data), which `safetensors.torch.load_file` and PEFT read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from dnd_jax.errors import DndError
from dnd_jax.fileio import atomic_file

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# Names used in configs and specs ("bfloat16", "float32", ...).
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_MAX_HEADER = 100_000_000


def dtype_name(dtype: np.dtype) -> str:
    """Returns "float32", "bfloat16", ... for a NumPy dtype."""
    return np.dtype(dtype).name


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Parses and validates a safetensors header.

    Args:
      path: the .safetensors file.

    Returns:
      (tensors: name -> {"dtype", "shape", "data_offsets"}, metadata dict, data start offset).
    """
    path = Path(path)
    if not path.is_file():
        raise DndError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DndError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise DndError(f"{path}: corrupt or truncated safetensors header (length {n}, file {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DndError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise DndError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DndError(f"{path}: key {name!r}: corrupt header entry {info!r}") from None
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start < 0:
            raise DndError(f"{path}: key {name!r}: byte range {start}..{end} does not match shape {shape}")
        if end > data_len:
            raise DndError(f"{path}: key {name!r}: file truncated (tensor ends at byte {end}, data holds {data_len})")
    return header, metadata, 8 + n


def load(path: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Loads every tensor of a safetensors file as NumPy arrays.

    Args:
      path: the .safetensors file.
      mmap: memory-map instead of reading into memory (arrays are then read-only views).

    Returns:
      (tensors by name, in file order; the file's `__metadata__` dict).
    """
    header, metadata, start = read_header(path)
    if mmap and header:
        buf = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    else:
        with open(path, "rb") as f:
            f.seek(start)
            buf = np.frombuffer(f.read(), dtype=np.uint8)
    out = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        out[name] = buf[s:e].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out, dict(metadata)


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors to a safetensors file atomically (temp name, then rename).

    Args:
      path: destination file.
      tensors: name -> array (any layout; written C-contiguous).
      metadata: optional string -> string metadata.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise DndError(f"{path}: key {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_file(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
