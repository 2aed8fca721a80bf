"""depthkit.export."""
