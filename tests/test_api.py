"""The curated public API: everything public is exported, and nothing else."""

from __future__ import annotations

import inspect

import shardstream
import shardstream.errors as errors


def test_all_names_exist():
    for name in shardstream.__all__:
        assert hasattr(shardstream, name), name


def test_every_error_is_exported_and_a_shardstream_error():
    for name, obj in vars(errors).items():
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert name in shardstream.__all__, name
            assert issubclass(obj, shardstream.ShardstreamError)


def test_no_public_module_level_objects_missing_from_all():
    public = {n for n, v in vars(shardstream).items()
              if not n.startswith("_") and not inspect.ismodule(v)}
    assert public <= set(shardstream.__all__), public - set(shardstream.__all__)


def test_errors_mix_in_the_builtin_they_mean():
    assert issubclass(shardstream.ShardNotFoundError, FileNotFoundError)
    assert issubclass(shardstream.DatasetExistsError, FileExistsError)
    assert issubclass(shardstream.EncodeError, ValueError)
    assert issubclass(shardstream.StorageError, OSError)


def test_packing_half_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, shardstream; assert 'torch' not in sys.modules; "
            "shardstream.ShardStream; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
