"""``python -m router`` is ``kars``."""

import sys

from router import cli

sys.exit(cli.main())
