"""`python -m rlgen ...`: the same as the `rlgen` command."""

from rlgen.cli import main

raise SystemExit(main())
