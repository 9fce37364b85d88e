"""Chat sources in the formats users have: JSON/JSONL (:mod:`dflash_jax.data.readers`), a Parquet file, and a local
Hugging Face ``datasets`` directory (``save_to_disk`` Arrow files or a folder of Parquet shards), read with pyarrow.

Every source yields ``(record, Conversation | Skip)`` in file order, ``record`` counting rows from 0 over the files
in name order. Table rows go through the same :func:`~dflash_jax.data.readers.parse_record` as JSON records, after
the column mapping (config ``data.messages_field`` / ``data.role_field`` / ``data.content_field``) renames the
user's columns to the canonical ShareGPT / OpenAI keys.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Any, Iterator, Union

from dflash_jax.data.readers import (
    FORMATS,
    Conversation,
    Fields,
    Skip,
    _open_source,
    map_fields,
    parse_record,
    read_indexed,
)

Item = tuple[int, Union[Conversation, Skip]]
_BATCH_ROWS = 1024  # rows per pyarrow batch (bounded memory: one batch of Python dicts at a time)


def source_files(path: str) -> list[str]:
    """The files behind ``data.path``: the file itself, or a directory's ``*.arrow`` (save_to_disk) files, else its
    ``*.parquet`` files (recursively), in name order. ValueError naming ``data.path`` when there are none."""
    if not os.path.isdir(path):
        return [path]
    for pattern in ("*.arrow", "**/*.parquet"):
        files = sorted(glob.glob(os.path.join(path, pattern), recursive=True))
        if files:
            return files
    raise ValueError(f"data.path {path!r} is a directory without *.arrow (save_to_disk) or *.parquet files")


def _is_table(path: str) -> bool:
    return os.path.isdir(path) or path.endswith((".parquet", ".arrow"))


def _arrow_batches(file: str) -> Iterator[Any]:
    """Record batches of one Arrow file: the IPC stream format ``save_to_disk`` writes, or the IPC file format."""
    import pyarrow as pa

    source = pa.memory_map(file)
    try:
        reader = pa.ipc.open_stream(source)
        yield from reader
    except pa.ArrowInvalid:
        source = pa.memory_map(file)
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _parquet_batches(file: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS)


def read_records(path: str, fmt: str = "auto", fields: Fields = (None, None, None)) -> Iterator[Item]:
    """``(record, Conversation | Skip)`` for every record of ``data.path``: JSON/JSONL (or ``sharegpt``) via
    :func:`~dflash_jax.data.readers.read_indexed`, a ``.parquet`` / ``.arrow`` file or a datasets directory via
    pyarrow, one batch of rows at a time. ``fields`` = ``(messages, role, content)`` names (None = the format's
    own keys; with a mapping, ``fmt`` ``auto`` means ``openai``)."""
    if not _is_table(path):
        yield from read_indexed(path, fmt, fields=fields)
        return
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    if any(fields) and fmt == "auto":
        fmt = "openai"
    record = 0
    for file in source_files(path):
        for batch in _parquet_batches(file) if file.endswith(".parquet") else _arrow_batches(file):
            for row in batch.to_pylist():
                parsed = parse_record(map_fields(row, fmt, fields), fmt)
                yield record, Skip(record, parsed) if isinstance(parsed, str) else parsed
                record += 1


def file_digest(file: str) -> dict[str, Any]:
    """``{"name", "bytes", "sha256"}`` of one file (``sharegpt``: the file inside the wheel), read in 1 MiB
    chunks, and ``mtime_ns`` (its modification time) when it is a file on disk."""
    h, n = hashlib.sha256(), 0
    with _open_source(file) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    out = {"name": os.path.basename(file), "bytes": n, "sha256": h.hexdigest()}
    if os.path.isfile(file):
        out["mtime_ns"] = os.stat(file).st_mtime_ns
    return out
