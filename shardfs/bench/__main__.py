"""``python -m shardfs.bench``: what ``scripts/bench`` runs."""

import sys

from shardfs.bench.run import main

sys.exit(main())
