"""``python -m tick_lightning.reporting RUN_DIR [--out DIR]``."""

from tick_lightning.reporting import main

raise SystemExit(main())
