"""``python -m morphc``: the same as the ``morphc`` command."""

import sys

from morphc.cli import main

sys.exit(main())
