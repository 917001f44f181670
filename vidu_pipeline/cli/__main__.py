"""``python -m vidu_pipeline.cli …``: the same entry point as the ``vidu-pipeline`` script."""

import sys

from . import main

sys.exit(main())
