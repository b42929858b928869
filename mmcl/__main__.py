"""`python -m mmcl` is the same as the `mmcl` command."""

from mmcl.cli import main

raise SystemExit(main())
