"""``python -m asyncdist.naming``: run a name server (the same as ``asyncdist ns``)."""

import sys

from . import main

sys.exit(main())
