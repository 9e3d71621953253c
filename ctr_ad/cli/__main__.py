"""``python -m ctr_ad.cli``: the same as the ``ctr-ad`` script (used by torchrun and the tests)."""

import sys

from ctr_ad.cli import main

sys.exit(main())
