"""``python -m shardfs``: the same as the ``shardfs`` console script."""

import sys

from shardfs.cli import main

sys.exit(main())
