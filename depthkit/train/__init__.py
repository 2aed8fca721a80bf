"""depthkit.train: LightningModules, the data module, callbacks and the LightningCLI entry point.

The only package (with `depthkit.cli`) that imports lightning.
"""

from depthkit.train.callbacks import ImagePanels, Preemption, ProgressBar, ThroughputMonitor
from depthkit.train.config import LossWeights, OptimConfig
from depthkit.train.data import DepthDataModule
from depthkit.train.loggers import CSVLogger
from depthkit.train.module import DepthModule, StudentModule
from depthkit.train.parallel import FSDP2Strategy

__all__ = [
    "CSVLogger",
    "DepthDataModule",
    "DepthModule",
    "FSDP2Strategy",
    "ImagePanels",
    "LossWeights",
    "OptimConfig",
    "Preemption",
    "ProgressBar",
    "StudentModule",
    "ThroughputMonitor",
]
