"""vidu_pipeline: video datasets from the Vidu Q1 Reference-to-Video API, orchestrated by Dagster."""

__version__ = "0.1.0"
