"""``manifest.json``: the dataset's table of contents, written last.

It lists every shard in order with its sample count, byte sizes and sha256,
plus the field schema seen while writing, so readers know exact counts
before opening a shard.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .compression import Compression
from .errors import ManifestError, StorageError

__all__ = ["MANIFEST_NAME", "FORMAT_VERSION", "ShardInfo", "Manifest", "SchemaBuilder",
           "load_manifest"]

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "shardstream"
FORMAT_VERSION = 1
#: manifests of compressed datasets, one zstd frame per block (read only)
FORMAT_VERSION_COMPRESSED = 2
#: manifests of compressed datasets made of frames of samples (written now); older
#: readers refuse them with "upgrade shardstream"
FORMAT_VERSION_FRAMED = 3
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_COMPRESSED, FORMAT_VERSION_FRAMED)


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it."""

    name: str
    num_samples: int
    bytes: int
    sha256: str
    num_blocks: int
    index: str
    index_bytes: int
    index_sha256: str


@dataclass
class Manifest:
    """The dataset description stored in ``manifest.json``."""

    shards: list[ShardInfo] = field(default_factory=list)
    schema: dict[str, dict[str, Any]] = field(default_factory=dict)
    key_field: str = "__key__"
    block_bytes: int = 65536
    version: int = FORMAT_VERSION
    created_by: str = ""
    #: ``"shardstream"`` (block shards) or ``"webdataset"`` (foreign tars indexed in place)
    layout: str = "shardstream"
    #: how blocks are compressed; ``None``: stored raw (and the manifest stays version 1)
    compression: Compression | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes + s.index_bytes for s in self.shards)

    def shard_starts(self) -> list[int]:
        """Global ordinal of each shard's first sample."""
        out, acc = [], 0
        for s in self.shards:
            out.append(acc)
            acc += s.num_samples
        return out

    def to_json(self) -> str:
        doc: dict[str, Any] = {
               "format": FORMAT_NAME, "version": self.version, "created_by": self.created_by,
               "codec": {"name": "msgpack", "ndarray_ext": 1}}
        if self.compression is not None and self.compression.framed:
            doc["codec"]["packed_ext"] = 2
        if self.compression is not None:
            doc["version"] = max(self.version, FORMAT_VERSION_FRAMED if self.compression.framed
                                 else FORMAT_VERSION_COMPRESSED)
            doc["compression"] = self.compression.to_json()
        doc.update({
               "layout": self.layout, "key_field": self.key_field,
               "block_bytes": self.block_bytes,
               "num_samples": self.num_samples, "total_bytes": self.total_bytes,
               "num_shards": len(self.shards),
               "shards": [asdict(s) for s in self.shards], "schema": self.schema})
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = MANIFEST_NAME) -> "Manifest":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc}); rewrite the dataset") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ManifestError(f"{where}: not a shardstream manifest")
        version = doc.get("version")
        if version not in FORMAT_VERSIONS:
            raise ManifestError(f"{where}: format version {version!r} is not supported by this "
                                f"shardstream (reads versions "
                                f"{', '.join(map(str, FORMAT_VERSIONS))}); upgrade shardstream")
        try:
            compression = None if doc.get("compression") is None else \
                Compression.from_json(doc["compression"], where=where)
        except ValueError as exc:
            raise ManifestError(str(exc)) from exc
        try:
            shards = [ShardInfo(**s) for s in doc["shards"]]
            return cls(shards=shards, schema=doc.get("schema", {}),
                       key_field=doc.get("key_field", "__key__"),
                       block_bytes=int(doc.get("block_bytes", 65536)), version=version,
                       created_by=doc.get("created_by", ""),
                       layout=doc.get("layout", "shardstream"), compression=compression)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: malformed shard list ({exc})") from exc

    def save(self, directory: str) -> None:
        """Write atomically: temp file, fsync, rename, fsync the directory."""
        atomic_write(os.path.join(directory, MANIFEST_NAME), self.to_json().encode())


def load_manifest(directory: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read ``<directory>/manifest.json``; ``directory`` may be a URL (s3://, gs://, http://)."""
    from . import storage

    if storage.is_remote(directory):
        url = storage.join(directory, MANIFEST_NAME)
        try:
            data = storage.read_bytes(url, storage_options=storage_options)
        except FileNotFoundError:
            raise ManifestError(f"{url} does not exist: {directory} is not a (finished) "
                                "shardstream dataset") from None
        return Manifest.from_json(data.decode("utf-8"), where=url)
    directory = storage.local_path(directory)
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist: {directory} is not a (finished) "
                            "shardstream dataset") from None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return Manifest.from_json(text, where=path)


def fsync_dir(directory: str) -> None:
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


def atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


# ---------------------------------------------------------------- schema
_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str", bytes: "bytes",
               type(None): "null", list: "list", tuple: "list", np.ndarray: "ndarray"}


_FAST_TYPES = frozenset((int, float, bool, str, bytes, type(None), np.ndarray))


class SchemaBuilder:
    """Accumulates the fields seen: dotted path -> count, types, array dtype/shape.

    Samples of a shape seen before (same keys, same value types, no nested
    containers) take a fast path: one dict lookup, counts folded in later.
    """

    def __init__(self) -> None:
        self._fields: dict[str, dict[str, Any]] = {}
        self._shapes: dict[tuple, list] = {}  # (keys, types) -> [count, array keys]

    def known(self, sample: dict) -> bool:
        """Count ``sample`` if its shape was seen (and checked) before; else False."""
        entry = self._shapes.get((tuple(sample), tuple(map(type, sample.values()))))
        if entry is None:
            return False
        entry[0] += 1
        for k in entry[1]:
            _observe_array(self._fields[k], sample[k])
        return True

    def observe(self, sample: dict, prefix: str = "") -> None:
        """Record a sample that passed :func:`check_sample` (the slow, general path)."""
        fields = self._fields
        for k, v in sample.items():
            t = type(v)
            if t is dict:
                self.observe(v, f"{prefix}{k}.")
                continue
            path = prefix + k if prefix else k
            f = fields.get(path)
            if f is None:
                f = fields[path] = {"count": 0, "types": set()}
            f["count"] += 1
            name = _TYPE_NAMES.get(t) or _type_name(v)
            f["types"].add(name)
            if name in ("ndarray", "tensor"):
                _observe_array(f, v)
        if not prefix:
            types = tuple(map(type, sample.values()))
            if _FAST_TYPES.issuperset(types):
                arrays = [k for k, t in zip(sample, types) if t is np.ndarray]
                self._shapes[(tuple(sample), types)] = [0, arrays]

    def _fold(self) -> None:
        for (keys, types), entry in self._shapes.items():
            if entry[0]:
                for k, t in zip(keys, types):
                    f = self._fields[k]
                    f["count"] += entry[0]
                    f["types"].add(_TYPE_NAMES[t])
                entry[0] = 0

    def merge(self, other: "SchemaBuilder | dict[str, dict[str, Any]]") -> None:
        self._fold()
        items = other.to_dict() if isinstance(other, SchemaBuilder) else other
        for path, g in items.items():
            f = self._fields.setdefault(path, {"count": 0, "types": set()})
            f["count"] += g["count"]
            f["types"].update(g["types"])
            if "dtypes" in g:
                f.setdefault("dtypes", set()).update(g["dtypes"])
                shape = g["shape"]
                if "shape" not in f:
                    f["shape"] = tuple(shape) if shape is not None else None
                else:
                    f["shape"] = _merge_shape(f["shape"], shape)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        self._fold()
        out = {}
        for path, f in sorted(self._fields.items()):
            d: dict[str, Any] = {"count": f["count"], "types": sorted(f["types"])}
            if "dtypes" in f:
                d["dtypes"] = sorted(f["dtypes"])
                d["shape"] = None if f["shape"] is None else list(f["shape"])
            out[path] = d
        return out


def _type_name(v: Any) -> str:
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (bytes, bytearray)):
        return "bytes"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, np.ndarray):
        return "ndarray"
    if type(v).__module__ == "torch":
        return "tensor"
    return type(v).__name__


_dtype_names: dict[Any, str] = {}


def _observe_array(f: dict[str, Any], v: Any) -> None:
    dtype = _dtype_names.get(v.dtype)
    if dtype is None:
        dtype = _dtype_names[v.dtype] = str(v.dtype).replace("torch.", "")
    shape = tuple(v.shape)
    if "dtypes" not in f:
        f["dtypes"] = {dtype}
        f["shape"] = shape
        return
    f["dtypes"].add(dtype)
    if f["shape"] != shape:
        f["shape"] = _merge_shape(f["shape"], shape)


def _merge_shape(a: tuple | list | None, b: tuple | list | None) -> tuple | None:
    """Per-dimension size where all agree, None where they vary; None if ndim varies."""
    if a is None or b is None or len(a) != len(b):
        return None
    return tuple(x if x == y else None for x, y in zip(a, b))
