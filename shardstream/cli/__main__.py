"""``python -m shardstream.cli``: the ``shardstream`` command (as ``python -m shardstream``)."""

import sys

from shardstream.cli.commands import main

sys.exit(main())
