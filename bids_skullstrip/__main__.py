"""``python -m bids_skullstrip``: the BIDS App, as the ``bids_skullstrip`` command."""

import sys

from .cli.run import main

sys.exit(main())
