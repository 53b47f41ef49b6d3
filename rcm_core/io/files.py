"""Byte I/O on any fsspec URL (local path, file://, s3://) with atomic writes."""
from __future__ import annotations

import os
import uuid
from typing import Optional

import fsspec


def _is_local(fs) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protos or "local" in protos


def atomic_write_bytes(url: str, data: bytes, storage_options: Optional[dict] = None) -> None:
    """Write ``data`` to ``url`` so that readers never see a half-written file.

    Locally: write a temporary file beside it, then rename (atomic). On object
    stores: one upload, which becomes visible only when it completes.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(url: str, storage_options: Optional[dict] = None) -> bytes:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file: {url}")
    return fs.cat_file(path)


def exists(url: str, storage_options: Optional[dict] = None) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(path)
