"""Optional integrations with other frameworks; each lives in its own module.

Importing this package imports nothing heavy: a module is loaded only when
asked for, and raises a clear ``ImportError`` naming the extra to install.

- :mod:`shardstream.integrations.ray` -- pack a Ray Dataset (or the CLI's
  input files) into a shardstream dataset on a Ray cluster
  (``pip install 'shardstream[ray]'``).
"""

__all__: list[str] = []
