import sys

from shardstream.cli.commands import main

sys.exit(main())
