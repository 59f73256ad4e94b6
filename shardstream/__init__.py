"""shardstream: pack lists of dicts into tar shards and stream them into PyTorch."""

__version__ = "0.1.0"
