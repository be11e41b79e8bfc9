"""``python -m tick_lightning.report RUN_DIR [--out DIR]``."""

from tick_lightning.report import main

raise SystemExit(main())
