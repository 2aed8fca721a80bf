"""depthkit.train: LightningModules, the data module, callbacks and the LightningCLI entry point.

The only package (with `depthkit.cli`) that imports lightning.
"""

from depthkit.train.callbacks import ImagePanels, Preemption, ThroughputMonitor
from depthkit.train.config import LossWeights, OptimConfig
from depthkit.train.data import DepthDataModule
from depthkit.train.module import DepthModule, StudentModule

__all__ = [
    "DepthDataModule",
    "DepthModule",
    "ImagePanels",
    "LossWeights",
    "OptimConfig",
    "Preemption",
    "StudentModule",
    "ThroughputMonitor",
]
