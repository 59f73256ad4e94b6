"""The command line: ``shardstream`` (info, verify, index, cat, convert) and
``shardstream-write``. Nothing in the library imports this package."""

from shardstream.cli.commands import main, write_main

__all__ = ["main", "write_main"]
