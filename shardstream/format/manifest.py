"""``manifest.json``: the dataset's table of contents, written last.

It lists every shard in order with its sample count, byte sizes and sha256,
plus the field schema seen while writing, so readers know exact counts
before opening a shard.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shardstream.errors import ManifestError
from shardstream.format.compression import Compression

__all__ = ["MANIFEST_NAME", "FORMAT_VERSION", "ShardInfo", "Manifest", "LOCK_NAME",
           "STAGING_PREFIX", "LAYOUTS", "check_name"]


MANIFEST_NAME = "manifest.json"
#: the writers' lock file inside a dataset directory (see :mod:`shardstream.write.publish`)
LOCK_NAME = ".shardstream.lock"
#: hidden folders a writer stages its shards in, inside the dataset directory
STAGING_PREFIX = ".staging-"
#: ``"shardstream"``: block shards; ``"webdataset"``: foreign tars indexed in place
LAYOUTS = ("shardstream", "webdataset")
#: no real shard, index or sample count comes near this (256 TiB)
MAX_SIZE = 1 << 48
FORMAT_NAME = "shardstream"
FORMAT_VERSION = 1
#: manifests of compressed datasets, one zstd frame per block (read only)
FORMAT_VERSION_COMPRESSED = 2
#: manifests of compressed datasets made of frames of samples (read only)
FORMAT_VERSION_FRAMED = 3
#: manifests of shardstream-layout datasets whose indexes carry block checksums (written
#: now, raw or framed; ``compression`` says which); older readers refuse them with
#: "upgrade shardstream"
FORMAT_VERSION_CHECKSUMS = 4
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_COMPRESSED, FORMAT_VERSION_FRAMED,
                   FORMAT_VERSION_CHECKSUMS)


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
        if self.compression is not None and not self.compression.framed:
            doc["version"] = max(self.version, FORMAT_VERSION_COMPRESSED)  # v2: no checksums
        elif self.layout == "shardstream":  # indexes written now carry block checksums
            doc["version"] = max(self.version, FORMAT_VERSION_CHECKSUMS)
        if self.compression is not None:
            doc["compression"] = self.compression.to_json()
        doc.update({
               "layout": self.layout, "key_field": self.key_field,
               "block_bytes": self.block_bytes,
               "num_samples": self.num_samples, "total_bytes": self.total_bytes,
               "num_shards": len(self.shards),
               "shards": [asdict(s) for s in self.shards], "schema": self.schema})
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = MANIFEST_NAME) -> "Manifest":
        """Parse and check a manifest; every problem is a :class:`ManifestError` naming
        ``where`` and the entry (``shards[3].name``). See :func:`check_entries`."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError(f"{where}: not UTF-8 text (byte {exc.start}); the file is "
                                    "damaged: rewrite the dataset or restore manifest.json "
                                    "from a good copy") from None
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc}); rewrite the dataset") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ManifestError(f"{where}: not a shardstream manifest")
        version = doc.get("version")
        if type(version) is not int or version not in FORMAT_VERSIONS:
            raise ManifestError(f"{where}: format version {version!r} is not supported by this "
                                f"shardstream (reads versions "
                                f"{', '.join(map(str, FORMAT_VERSIONS))}); upgrade shardstream")
        try:
            compression = None if doc.get("compression") is None else \
                Compression.from_json(doc["compression"], where=where)
        except ValueError as exc:
            raise ManifestError(str(exc)) from exc
        top = _check_top(doc, where)
        shards = check_entries(doc.get("shards"), where, top["layout"])
        return cls(shards=shards, version=version, compression=compression, **top)


# ---------------------------------------------------------------- checks on load
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENTRY_FIELDS = tuple(f.name for f in fields(ShardInfo))
_REWRITE = ("the manifest is damaged or was tampered with: rewrite the dataset, or restore "
            "manifest.json from a trusted copy")


def _fail(where: str, what: str, problem: str) -> ManifestError:
    return ManifestError(f"{where}: {what} {problem}; {_REWRITE}")


def _check_top(doc: dict, where: str) -> dict[str, Any]:
    """The top-level fields, type-checked: key_field, block_bytes, layout, schema, created_by."""
    layout = doc.get("layout", "shardstream")
    if layout not in LAYOUTS:
        raise _fail(where, "layout", f"is {layout!r}, not one of {', '.join(LAYOUTS)}")
    key_field = doc.get("key_field", "__key__")
    if not isinstance(key_field, str) or not key_field:
        raise _fail(where, "key_field", f"must be a non-empty string, got {key_field!r}")
    block_bytes = doc.get("block_bytes", 65536)
    low = 1 if layout == "shardstream" else 0  # indexed foreign tars have no blocks
    if type(block_bytes) is not int or not low <= block_bytes <= 2**31:
        raise _fail(where, "block_bytes", f"must be an int in [{low}, 2**31], got "
                    f"{block_bytes!r}")
    schema = doc.get("schema", {})
    if not isinstance(schema, dict):
        raise _fail(where, "schema", f"must be an object, got {type(schema).__name__}")
    for path, f in schema.items():
        _check_schema_field(f, where, f"schema[{path!r}]")
    created_by = doc.get("created_by", "")
    if not isinstance(created_by, str):
        raise _fail(where, "created_by", f"must be a string, got {created_by!r}")
    return {"key_field": key_field, "block_bytes": block_bytes, "layout": layout,
            "schema": schema, "created_by": created_by}


def _check_schema_field(f: object, where: str, at: str) -> None:
    """``{"count": int, "types": [str], "dtypes": [str], "shape": [int | None] | None}``."""
    def strings(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    ok = isinstance(f, dict) and type(f.get("count")) is int and f["count"] >= 0 \
        and strings(f.get("types")) and ("dtypes" not in f or strings(f["dtypes"])) \
        and (f.get("shape") is None or (isinstance(f["shape"], list) and all(
            x is None or type(x) is int for x in f["shape"])))
    if not ok:
        raise _fail(where, at, "must be {\"count\": int, \"types\": [str, ...]} (and "
                    "\"dtypes\", \"shape\" for arrays)")


def check_name(name: object, *, relative_path: bool = False) -> str | None:
    """Why ``name`` is not a plain file name inside a dataset, or None when it is one.

    ``relative_path``: a relative path with ``/`` separators (``../tars/x.tar``)
    is allowed too (shards of the ``webdataset`` layout, indexed in place).
    """
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "is empty"
    if _CONTROL.search(name):
        return f"{name!r} holds a NUL or other control character"
    if "\\" in name:
        return f"{name!r} holds a '\\' separator"
    if name.startswith("/") or os.path.isabs(name) or re.match(r"[A-Za-z]:", name):
        return f"{name!r} is an absolute path"
    parts = name.split("/")
    if len(parts) > 1 and not relative_path:
        return f"{name!r} holds a '/' separator: it must be a file name inside the dataset"
    if any(p in ("", ".") for p in parts) or parts[-1] == "..":
        return f"{name!r} is not a file name"
    if len(parts) == 1 and (name in (MANIFEST_NAME, LOCK_NAME) or name.startswith(STAGING_PREFIX)):
        return f"{name!r} is a name shardstream reserves for itself"
    return None


def check_entries(entries: object, where: str, layout: str = "shardstream") -> list[ShardInfo]:
    """The manifest's ``shards`` list, every entry checked (see docs/safety.md).

    Names and index names are plain file names inside the dataset, all distinct
    (shard names of the ``webdataset`` layout may be relative paths);
    ``num_samples`` is an int >= 1 (and at most ``index_bytes``: an index holds
    at least a byte per sample); byte sizes are ints in [0, 2**48]; checksums
    are 64 lowercase hex digits (a foreign tar indexed without ``checksum`` has
    an empty ``sha256``); ``num_blocks`` is an int >= 0. ``bool`` is not an int.
    """
    if not isinstance(entries, list):
        raise _fail(where, "shards", f"must be a list, got {type(entries).__name__}")
    out: list[ShardInfo] = []
    seen: dict[str, str] = {}
    for i, e in enumerate(entries):
        info = _check_entry(i, e, where, layout)
        for attr in ("name", "index"):
            value = getattr(info, attr)
            key = os.path.normpath(value)
            if key in seen:
                raise _fail(where, f"shards[{i}].{attr}", f"{value!r} is listed twice "
                            f"(also as {seen[key]})")
            seen[key] = f"shards[{i}].{attr}"
        out.append(info)
    return out


def _check_entry(i: int, e: object, where: str, layout: str) -> ShardInfo:
    at = f"shards[{i}]"
    if not isinstance(e, dict):
        raise _fail(where, at, f"must be an object, got {type(e).__name__}")
    missing = [k for k in _ENTRY_FIELDS if k not in e]
    if missing:
        raise _fail(where, at, f"lacks {', '.join(map(repr, missing))}")
    unknown = [k for k in e if k not in _ENTRY_FIELDS]
    if unknown:
        raise _fail(where, at, f"has unknown field(s) {', '.join(map(repr, unknown))}")
    for attr in ("name", "index"):
        problem = check_name(e[attr], relative_path=attr == "name" and layout == "webdataset")
        if problem:
            raise _fail(where, f"{at}.{attr}", problem)
    for attr in ("bytes", "index_bytes", "num_blocks", "num_samples"):
        v = e[attr]
        if type(v) is not int or not 0 <= v <= MAX_SIZE:
            raise _fail(where, f"{at}.{attr}", f"must be an int in [0, 2**48], got {v!r}")
    if not 1 <= e["num_samples"] <= e["index_bytes"]:
        raise _fail(where, f"{at}.num_samples", f"is {e['num_samples']}: a shard holds at "
                    f"least 1 sample and at most one per byte of its index "
                    f"({e['index_bytes']} bytes)")
    for attr in ("sha256", "index_sha256"):
        v = e[attr]
        empty_ok = attr == "sha256" and layout == "webdataset"  # indexed with checksum=False
        if not isinstance(v, str) or not (_HEX64.fullmatch(v) or (empty_ok and v == "")):
            raise _fail(where, f"{at}.{attr}", f"must be 64 lowercase hex digits, got {v!r}")
    return ShardInfo(**e)
