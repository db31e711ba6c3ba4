"""``python -m attnhooks.cli``."""

from attnhooks.cli.main import main

raise SystemExit(main())
