"""``python -m morphc``: the same as the ``morphc`` command."""

import sys

from morphc.tools.cli import main

sys.exit(main())
