"""depthkit.eval."""
