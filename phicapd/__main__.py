"""``python -m phicapd``: the same as the ``phicapd`` command."""

import sys

from phicapd.cli.daemon import main

sys.exit(main())
