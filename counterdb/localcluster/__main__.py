"""``python -m counterdb.localcluster``: the ``counterdb-cluster`` command."""

import sys

from counterdb.localcluster.cli import main

sys.exit(main())
