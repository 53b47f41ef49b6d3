"""One storage code path for local paths, ``file://`` and ``s3://`` (any fsspec URL).

* :class:`Storage` wraps an fsspec filesystem rooted at a URL. Writes are atomic:
  local/posix-like filesystems write to a temporary name and rename; object stores
  (S3, GCS, ...) write the whole object in one PUT (an object is only visible once
  complete).
* Shards: dicts of tensors saved with safetensors, with a JSON manifest that lists
  counts, shapes, dtypes and sha256 checksums. The manifest entry of a shard is
  written only after the shard itself, so a shard listed in the manifest is complete.
  Readers verify the checksum and the shapes and name the culprit on any mismatch.

Storage options (e.g. ``{"endpoint_url": ...}`` for a non-AWS S3) come from the
``storage_options`` argument or, so that they travel into Metaflow tasks and torchrun
workers, from the ``RCM_STORAGE_OPTIONS`` environment variable (JSON).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = [
    "StorageError", "ShardError", "Storage", "storage_options_from_env",
    "sha256_bytes", "tensors_to_bytes", "tensors_from_bytes",
    "ShardSet", "SHARD_MANIFEST", "spec_diff", "ContentStore", "sha256_file",
]

SHARD_MANIFEST = "manifest.json"
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}


class StorageError(RuntimeError):
    """A storage URL is unusable (no credentials, unreachable, unreadable)."""


class ShardError(RuntimeError):
    """A shard or a manifest is missing, corrupt or inconsistent; ``fix`` says what to do about it."""

    fix = ""

    def __init__(self, message: str = "", *, fix: Optional[str] = None):
        super().__init__(message)
        if fix:
            self.fix = fix


def storage_options_from_env() -> Dict[str, Any]:
    raw = os.environ.get("RCM_STORAGE_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StorageError(f"RCM_STORAGE_OPTIONS is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise StorageError("RCM_STORAGE_OPTIONS must be a JSON object")
    return opts


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def tensors_from_bytes(data: bytes) -> Dict[str, Any]:
    from safetensors.torch import load

    return load(data)


def _check_s3_credentials(url: str, opts: Mapping[str, Any]) -> None:
    if opts.get("anon") or opts.get("key") or opts.get("token") or opts.get("profile"):
        return
    try:
        import botocore.session
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        return
    creds = botocore.session.Session().get_credentials()
    if creds is None:
        raise StorageError(
            f"storage URL {url!r} needs S3 credentials and none were found: set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance role), "
            "or pass key/secret (or anon=true) in RCM_STORAGE_OPTIONS")


class Storage:
    """A root URL plus an fsspec filesystem. Relative keys use '/'."""

    def __init__(self, root: str, storage_options: Optional[Mapping[str, Any]] = None):
        from rcm_core.io.files import url_to_fs

        if not isinstance(root, str) or not root.strip():
            raise StorageError(f"storage root must be a non-empty URL or path, got {root!r}")
        root = root.strip()
        opts = dict(storage_options_from_env())
        opts.update(storage_options or {})
        self.storage_options = opts
        self.protocol = root.split("://", 1)[0].lower() if "://" in root else "file"
        if self.protocol in ("s3", "s3a"):
            _check_s3_credentials(root, opts)
        try:
            self.fs, path = url_to_fs(root, opts)       # a rotated credential gets a new filesystem
        except (ImportError, ValueError) as e:
            raise StorageError(f"cannot open storage URL {root!r}: {e}") from e
        if self.protocol == "file":
            path = os.path.abspath(os.path.expanduser(path))
            root = path
        self.root = root.rstrip("/")
        self.root_path = path.rstrip("/") or "/"
        self.is_object_store = self.protocol in _OBJECT_STORES

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- naming ---------------------------------------------------------------
    def path(self, key: str = "") -> str:
        key = key.strip("/")
        return posixpath.join(self.root_path, key) if key else self.root_path

    def url(self, key: str = "") -> str:
        key = key.strip("/")
        return f"{self.root}/{key}" if key else self.root

    def child(self, key: str) -> "Storage":
        return Storage(self.url(key), self.storage_options)

    # -- I/O ------------------------------------------------------------------
    def _wrap(self, op: str, key: str, e: Exception) -> Exception:
        if isinstance(e, FileNotFoundError):
            return FileNotFoundError(f"{op}: {self.url(key)} does not exist")
        if isinstance(e, PermissionError):
            return StorageError(f"{op}: permission denied for {self.url(key)} "
                                f"(check the credentials for this storage root): {e}")
        return StorageError(f"{op}: {self.url(key)}: {type(e).__name__}: {e}")

    def exists(self, key: str) -> bool:
        try:
            return self.fs.exists(self.path(key))
        except Exception as e:  # noqa: BLE001 - name the URL
            raise self._wrap("exists", key, e) from e

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(key))
        except Exception as e:  # noqa: BLE001
            raise self._wrap("read", key, e) from e

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write atomically; returns the URL. Readers never see a partial object."""
        target = self.path(key)
        try:
            if self.is_object_store:
                self.fs.pipe_file(target, data)  # one PUT: visible only when complete
            else:
                parent = posixpath.dirname(target)
                self.fs.makedirs(parent, exist_ok=True)
                tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(target)}")
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, target)  # rename on local filesystems
        except Exception as e:  # noqa: BLE001
            raise self._wrap("write", key, e) from e
        return self.url(key)

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise ShardError(f"{self.url(key)} is not valid JSON: {e}") from None

    def write_json(self, key: str, obj: Any) -> str:
        return self.write_bytes(key, json.dumps(obj, indent=1, sort_keys=True).encode())

    def list(self, key: str = "") -> List[str]:
        """Relative names directly under ``key`` ('' when missing)."""
        try:
            entries = self.fs.ls(self.path(key), detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise self._wrap("list", key, e) from e
        return sorted(posixpath.basename(p.rstrip("/")) for p in entries)

    def rm(self, key: str, recursive: bool = False) -> None:
        try:
            if self.fs.exists(self.path(key)):
                self.fs.rm(self.path(key), recursive=recursive)
        except Exception as e:  # noqa: BLE001
            raise self._wrap("rm", key, e) from e

    def upload_dir(self, local_dir: str, key: str) -> str:
        """Copy a local folder (e.g. Data Docs) under ``key``; returns its URL."""
        for base, _dirs, files in os.walk(local_dir):
            for f in files:
                full = os.path.join(base, f)
                rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
                with open(full, "rb") as fh:
                    self.write_bytes(f"{key}/{rel}", fh.read())
        return self.url(key)

    def put_file(self, local_path: str, key: str) -> str:
        """Upload a local file (any size, streamed) atomically under ``key``; returns its URL."""
        target = self.path(key)
        try:
            if self.is_object_store:
                self.fs.put_file(local_path, target)        # multipart; the object appears when complete
            else:
                parent = posixpath.dirname(target)
                self.fs.makedirs(parent, exist_ok=True)
                tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(target)}")
                self.fs.put_file(local_path, tmp)
                self.fs.mv(tmp, target)
        except Exception as e:  # noqa: BLE001
            raise self._wrap("upload", key, e) from e
        return self.url(key)

    def get_file(self, key: str, local_path: str) -> None:
        """Download ``key`` to ``local_path`` (streamed; a temporary name until complete)."""
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        tmp = f"{local_path}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.get_file(self.path(key), tmp)
            os.replace(tmp, local_path)
        except Exception as e:  # noqa: BLE001
            if os.path.exists(tmp):
                os.remove(tmp)
            raise self._wrap("download", key, e) from e

    def check_writable(self) -> None:
        """Fail early, naming the root, when it cannot be written."""
        key = f".rcm-write-check-{uuid.uuid4().hex}"
        self.write_bytes(key, b"ok")
        self.rm(key)


# --- shards ---------------------------------------------------------------------

@dataclass
class ShardSet:
    """Shards of tensors under ``storage`` (a folder) with a manifest.

    ``spec`` describes what produced the shards (teacher, prompts, sampler...). A
    manifest with a different spec in the same folder is an error (callers put the
    spec hash in the folder name, so this only happens on a hash collision or misuse).
    """

    storage: Storage
    spec: Dict[str, Any] = field(default_factory=dict)
    manifest: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, storage: Storage, spec: Optional[Dict[str, Any]] = None) -> "ShardSet":
        if storage.exists(SHARD_MANIFEST):
            try:
                manifest = storage.read_json(SHARD_MANIFEST)
            except ShardError as e:
                raise ShardError(f"{e}", fix=f"the shards under {storage.url()} cannot be trusted without their "
                                            "manifest: delete that folder (it is recomputed)") from None
            if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", {}), dict):
                raise ShardError(f"manifest {storage.url(SHARD_MANIFEST)} is not a shard manifest "
                                 f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
            if spec is not None and manifest.get("spec") != spec:
                raise ShardError(
                    f"manifest {storage.url(SHARD_MANIFEST)} does not match this request: "
                    + spec_diff(manifest.get("spec"), spec, "manifest", "request"),
                    fix="the folder name is the hash of the request, so its manifest was changed or written by "
                        "other code: move the folder away (keep it if you need it); the next run recomputes it")
            return cls(storage, manifest.get("spec", {}), manifest)
        if spec is None:
            raise ShardError(f"no shard manifest at {storage.url(SHARD_MANIFEST)}")
        return cls(storage, spec, {"format": "rcm-shards/1", "spec": spec, "shards": {}, "extra": {}})

    @property
    def url(self) -> str:
        return self.storage.url(SHARD_MANIFEST)

    @property
    def shards(self) -> Dict[str, Dict[str, Any]]:
        return self.manifest.setdefault("shards", {})

    def has(self, name: str) -> bool:
        """Finished = listed in the manifest and its object exists."""
        entry = self.shards.get(name)
        return entry is not None and self.storage.exists(entry["file"])

    def write(self, name: str, tensors: Mapping[str, Any], meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Write a shard, then (last) its manifest entry."""
        data = tensors_to_bytes(tensors)
        fname = f"{name}.safetensors"
        self.storage.write_bytes(fname, data)
        counts = {int(v.shape[0]) for v in tensors.values() if getattr(v, "dim", lambda: 0)() > 0}
        entry = {
            "file": fname,
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "count": max(counts) if counts else 0,
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()},
            **(meta or {}),
        }
        self.shards[name] = entry
        self.flush()
        return entry

    def flush(self) -> None:
        self.manifest["total_count"] = sum(int(e.get("count", 0)) for e in self.shards.values()
                                            if not e.get("aux"))
        self.storage.write_json(SHARD_MANIFEST, self.manifest)

    def verify(self, name: str) -> Optional[str]:
        """None when shard ``name`` is listed, present, matches its checksum and decodes; else what is wrong."""
        entry = self.shards.get(name)
        if entry is None:
            return "not listed in the manifest"
        try:
            data = self.storage.read_bytes(entry["file"])
        except FileNotFoundError:
            return f"missing: {self.storage.url(entry['file'])}"
        digest = sha256_bytes(data)
        if digest != entry.get("sha256"):
            return (f"corrupt: sha256 of {self.storage.url(entry['file'])} is {digest[:12]}..., manifest says "
                    f"{str(entry.get('sha256'))[:12]}... ({len(data)} bytes, manifest says {entry.get('bytes')})")
        try:
            tensors = tensors_from_bytes(data)
        except Exception as e:  # noqa: BLE001
            return f"cannot be decoded: {e}"
        for k, shape in entry.get("shapes", {}).items():
            if k not in tensors or list(tensors[k].shape) != list(shape):
                return f"tensor {k!r} is {list(tensors[k].shape) if k in tensors else 'absent'}, manifest says {shape}"
        return None

    def read(self, name: str, expect_shapes: Optional[Mapping[str, Sequence[Optional[int]]]] = None) -> Dict[str, Any]:
        """Read a shard, verifying presence, checksum, shapes and dtypes."""
        entry = self.shards.get(name)
        if entry is None:
            raise ShardError(f"shard {name!r} is not listed in manifest {self.url}")
        url = self.storage.url(entry["file"])
        try:
            data = self.storage.read_bytes(entry["file"])
        except FileNotFoundError:
            raise ShardError(f"shard {name!r} is missing: {url} (listed in {self.url})") from None
        digest = sha256_bytes(data)
        if digest != entry["sha256"]:
            raise ShardError(f"shard {name!r} is corrupt: sha256 of {url} is {digest[:12]}..., "
                             f"manifest says {entry['sha256'][:12]}...")
        try:
            tensors = tensors_from_bytes(data)
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"shard {name!r} at {url} cannot be decoded: {e}") from e
        for k, shape in entry["shapes"].items():
            if k not in tensors:
                raise ShardError(f"shard {name!r} at {url} lacks tensor {k!r}")
            if list(tensors[k].shape) != list(shape):
                raise ShardError(f"shard {name!r} at {url}: tensor {k!r} has shape "
                                 f"{list(tensors[k].shape)}, manifest says {shape}")
        for k, shape in (expect_shapes or {}).items():
            got = list(tensors[k].shape) if k in tensors else None
            if got is None or len(got) != len(shape) or any(
                    s is not None and g != s for g, s in zip(got, shape)):
                raise ShardError(f"shard {name!r} at {url}: tensor {k!r} has shape {got}, "
                                 f"expected {list(shape)} (None = any)")
        return tensors

    def names(self, prefix: str = "") -> List[str]:
        return sorted(n for n in self.shards if n.startswith(prefix))

    def content_hash(self) -> str:
        """Hash of the spec and all shard checksums: the data lineage id."""
        h = hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode())
        for n in self.names():
            h.update(f"{n}:{self.shards[n]['sha256']}".encode())
        for k in sorted(self.manifest.get("extra", {})):
            h.update(f"{k}:{json.dumps(self.manifest['extra'][k], sort_keys=True)}".encode())
        return h.hexdigest()


def sha256_file(path: str, chunk: int = 16 * 2 ** 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class ContentStore:
    """Files addressed by their sha256 under ``<root>/sha256/<aa>/<hash>`` (any fsspec URL).

    Stored once however many model versions refer to them; readers verify the hash.
    """

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def key(digest: str) -> str:
        return f"sha256/{digest[:2]}/{digest}"

    def url(self, digest: str) -> str:
        return self.storage.url(self.key(digest))

    def put(self, local_path: str, digest: Optional[str] = None) -> str:
        """Store a local file (skipped when already there); returns its sha256."""
        digest = digest or sha256_file(local_path)
        if not self.storage.exists(self.key(digest)):
            self.storage.put_file(local_path, self.key(digest))
        return digest

    def get(self, digest: str, local_path: str) -> None:
        """Fetch ``digest`` to ``local_path``, verifying the hash (FileNotFoundError when absent)."""
        if not self.storage.exists(self.key(digest)):
            raise FileNotFoundError(f"{self.url(digest)} does not exist")
        self.storage.get_file(self.key(digest), local_path)
        got = sha256_file(local_path)
        if got != digest:
            os.remove(local_path)
            raise ShardError(f"{self.url(digest)} is corrupt: its sha256 is {got[:12]}..., expected {digest[:12]}...")


def spec_diff(a: Any, b: Any, a_name: str = "a", b_name: str = "b", limit: int = 8) -> str:
    """Readable differences of two spec dicts: ``field 'seed': manifest 0, request 1; ...``."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return f"{a_name} {a!r}, {b_name} {b!r}"
    diffs = [f"field {k!r}: {a_name} {_short(a.get(k, '(absent)'))}, {b_name} {_short(b.get(k, '(absent)'))}"
             for k in sorted(set(a) | set(b)) if a.get(k, object()) != b.get(k, object())]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def _short(v: Any, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def spec_hash(spec: Mapping[str, Any], n: int = 16) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:n]


def iter_chunks(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
