"""ShardDataset: random access equals sequential decode, errors, workers, memory."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from shardstream.errors import CorruptShardError, IndexMismatchError, ShardNotFoundError
from shardstream.pytorch.random_access import ShardDataset
from shardstream.read.dataset import iter_block_samples, load_index, open_dataset, read_block
from shardstream.write.writer import ShardWriter

N = 257


def make_samples(n: int = N) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        size = 3000 if i % 50 == 7 else int(rng.integers(0, 40))  # some large, standalone
        out.append({"id": i, "ids": rng.integers(0, 1000, size, dtype=np.int32),
                    "text": f"sample {i}", "meta": {"even": i % 2 == 0, "x": [i, 1.5]}})
    return out


def write(directory, samples, **kw) -> str:
    kw = {"max_samples": 40, "block_bytes": 600, "fsync": False, **kw}
    with ShardWriter(directory, **kw) as w:
        for s in samples:
            w.write(s)
    return str(directory)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return make_samples()


@pytest.fixture(scope="module")
def root(tmp_path_factory, samples) -> str:
    return write(tmp_path_factory.mktemp("ra") / "ds", samples)


def sequential(root: str) -> list[dict]:
    ds = open_dataset(root)
    out = []
    for info in ds.manifest.shards:
        index = load_index(ds, info)
        with open(ds.shard_path(info), "rb") as f:
            for b in range(index.num_blocks):
                out += iter_block_samples(read_block(f, index, b), index, b)
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], np.ndarray):
            if not np.array_equal(a[k], b[k]) or a[k].dtype != b[k].dtype:
                return False
        elif a[k] != b[k]:
            return False
    return True


def test_every_index_matches_sequential_decode(root, samples):
    ds = ShardDataset(root)
    manifest = ds.dataset.manifest
    assert len(manifest.shards) >= 6 and max(s.num_blocks for s in manifest.shards) > 1
    seq = sequential(root)
    assert len(ds) == len(seq) == N
    for i in range(N):
        assert same(ds[i], seq[i]) and same(ds[i], samples[i]), i


def test_arrays_are_read_only_views(root):
    x = ShardDataset(root)[7]["ids"]
    assert not x.flags.writeable and x.base is not None
    y = np.array(x)
    y[0] = -1
    assert y.flags.writeable


def test_negative_slices_and_index_errors(root, samples):
    ds = ShardDataset(root)
    assert ds[-1]["id"] == N - 1 and ds[-N]["id"] == 0
    assert [s["id"] for s in ds[10:20]] == list(range(10, 20))
    assert [s["id"] for s in ds[::-50]] == list(range(N - 1, -1, -50))
    assert ds[np.int64(3)]["id"] == 3
    for bad in (N, -N - 1, 10**9):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(TypeError):
        ds["3"]


def test_with_key_and_transform(root, tmp_path):
    ds = ShardDataset(root, with_key=True, transform=lambda s: (s["__key__"], s["id"]))
    assert ds[12] == ("000000012", 12)
    keyed = write(tmp_path / "k", [{"name": f"k{i}", "v": i} for i in range(30)],
                  key_field="name")
    assert ShardDataset(keyed, with_key=True)[5]["__key__"] == "k5"
    assert "__key__" not in ShardDataset(keyed)[5]


def test_empty_dataset(tmp_path):
    ds = ShardDataset(write(tmp_path / "e", []))
    assert len(ds) == 0
    with pytest.raises(IndexError):
        ds[0]


def _ids(batch) -> list[int]:
    return batch["id"].tolist()


def collate(samples: list[dict]) -> dict:
    return {"id": torch.tensor([s["id"] for s in samples])}


def test_dataloader_workers_shuffle_distributed(root):
    ds = ShardDataset(root)
    ds[0]  # maps opened in the parent, then forked into workers: must be re-opened there
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2,
                            collate_fn=collate, multiprocessing_context="fork")
        got = [i for b in loader for i in _ids(b)]
        assert len(got) == (N + 1) // 2
        seen += got
    assert set(seen) == set(range(N))  # N odd: DistributedSampler pads by one repeat


_GLOBAL: ShardDataset | None = None


def _in_child(_):
    ds = _GLOBAL
    inherited = [o for o in ds._open if o is not None]
    sample = ds[3]
    now = [o for o in ds._open if o is not None]
    return (os.getpid(), ds._pid, sample["id"], len(inherited),
            any(o is p for o in now for p in inherited))


def test_fork_reopens_maps(root):
    global _GLOBAL
    import multiprocessing as mp
    _GLOBAL = ds = ShardDataset(root)
    ds[3]
    with mp.get_context("fork").Pool(1) as pool:
        pid, owner, sid, inherited, reused = pool.apply(_in_child, (None,))
    assert pid != os.getpid() and owner == pid and sid == 3
    assert inherited == 1 and not reused  # the parent's map was dropped, a new one opened
    assert ds._pid == os.getpid()
    ds.close()


def test_pickle_drops_maps(root):
    import pickle
    ds = ShardDataset(root)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert all(o is None for o in clone._open) and clone[5]["id"] == 5


def _rss_anon_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def test_memory_stays_bounded(tmp_path):
    if _rss_anon_kb() is None:
        pytest.skip("no /proc/self/status RssAnon")
    blob = np.arange(16384, dtype=np.int64)  # 128 KiB per sample: 2,000 reads touch 256 MiB
    root = write(tmp_path / "big", [{"id": i, "x": blob} for i in range(64)], max_samples=16)
    ds = ShardDataset(root)
    for i in range(len(ds)):
        ds[i]
    before = _rss_anon_kb()
    for k in range(2000):
        assert ds[(k * 37) % len(ds)]["x"][0] == 0
    grown = _rss_anon_kb() - before
    assert grown < 16 * 1024, f"anonymous RSS grew by {grown} KiB"


def test_index_memory_is_16_bytes_per_sample(root):
    ds = ShardDataset(root)
    for i in range(0, N, 10):
        ds[i]
    assert ds.index_nbytes() == 16 * N


def test_missing_shard_eager_and_lazy(root, tmp_path):
    copy = shutil.copytree(root, tmp_path / "m")
    name = open_dataset(copy).manifest.shards[2].name
    os.remove(os.path.join(copy, name))
    with pytest.raises(ShardNotFoundError, match=name):
        ShardDataset(copy)
    ds = ShardDataset(copy, check_files=False)
    assert ds[0]["id"] == 0
    with pytest.raises(ShardNotFoundError, match=name):
        ds[100]


def test_missing_index_says_rebuild(root, tmp_path):
    copy = shutil.copytree(root, tmp_path / "mi")
    info = open_dataset(copy).manifest.shards[1]
    os.remove(os.path.join(copy, info.index))
    with pytest.raises(ShardNotFoundError, match="shardstream index"):
        ShardDataset(copy)
    with pytest.raises(ShardNotFoundError, match="shardstream index"):
        ShardDataset(copy, check_files=False)[50]


def test_truncated_shard_names_shard_and_sample(root, tmp_path):
    copy = shutil.copytree(root, tmp_path / "t")
    info = open_dataset(copy).manifest.shards[0]
    path = os.path.join(copy, info.name)
    os.truncate(path, info.bytes // 2)
    ds = ShardDataset(copy)
    with pytest.raises(CorruptShardError, match=r"truncated.*sample \d+ \(global \d+\)") as e:
        ds[0]
    assert info.name in str(e.value)


def test_index_of_another_shard_says_rebuild(root, tmp_path):
    copy = shutil.copytree(root, tmp_path / "x")
    a, b = open_dataset(copy).manifest.shards[:2]
    shutil.copy(os.path.join(copy, b.index), os.path.join(copy, a.index))
    with pytest.raises(IndexMismatchError, match="shardstream index"):
        ShardDataset(copy)[0]


def test_verify_detects_same_size_replacement(root, tmp_path):
    copy = shutil.copytree(root, tmp_path / "v")
    info = open_dataset(copy).manifest.shards[0]
    path = os.path.join(copy, info.name)
    data = bytearray(open(path, "rb").read())
    data[-1100] ^= 0xFF  # inside the tar padding / last block: same size, other bytes
    open(path, "wb").write(bytes(data))
    assert ShardDataset(copy)[0]["id"] == 0
    with pytest.raises(IndexMismatchError, match="sha256"):
        ShardDataset(copy, verify=True)[0]


def test_damaged_sample_bytes_name_the_sample(tmp_path):
    root = write(tmp_path / "d", [{"id": i, "s": "x" * 100} for i in range(10)], max_samples=100)
    info = open_dataset(root).manifest.shards[0]
    path = os.path.join(root, info.name)
    data = bytearray(open(path, "rb").read())
    data[512] = 0xC1  # never-used msgpack byte at the start of sample 0
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptShardError, match=r"sample 0 \(global 0\)"):
        ShardDataset(root)[0]


def test_remote_source_without_cache_dir_is_a_clear_error():
    with pytest.raises(ValueError, match="cache_dir"):
        ShardDataset("s3://bucket/data")
