"""``python -m dhp_fx``: the ``dhp-fx`` command line, for environments whose scripts dir is not on PATH."""
import sys

from .cli import main

sys.exit(main())
