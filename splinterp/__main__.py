"""`python -m splinterp ...` is the `splinterp` command line."""

import sys

from splinterp.cli import main

sys.exit(main())
