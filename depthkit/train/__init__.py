"""depthkit.train."""
