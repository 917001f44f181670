"""``python -m vidu_pipeline.cli …``: the same entry point as the ``vidu-pipeline`` script."""

from . import run

run()
