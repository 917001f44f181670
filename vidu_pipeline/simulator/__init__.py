"""A local, faithful Vidu Q1 reference-to-video service: the product's default backend.

It speaks the contract over real HTTP on loopback, renders a real deterministic MP4 per task,
keeps its tasks on disk across restarts, and misbehaves on request for tests and drills.
"""

from .faults import FaultConfig
from .service import Simulator, SimulatorConfig

__all__ = ["FaultConfig", "Simulator", "SimulatorConfig"]
