"""`python -m draftwise.cli`: the same as the `draftwise` command."""

import sys

from draftwise.cli.entry import main

sys.exit(main())
