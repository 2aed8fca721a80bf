"""depthkit.data."""
