"""depthkit: train monocular depth foundation models the Depth Anything way."""

__version__ = "0.1.0"
