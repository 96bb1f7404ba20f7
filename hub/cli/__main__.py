"""``python -m hub.cli``: the ``giftcard`` command line."""

import sys

from hub.cli import main

sys.exit(main())
