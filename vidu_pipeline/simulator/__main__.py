"""``python -m vidu_pipeline.simulator``: run the standalone simulator."""

import argparse
import sys

from .cli import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m vidu_pipeline.simulator", description=__doc__)
add_arguments(parser)
sys.exit(run(parser.parse_args()))
