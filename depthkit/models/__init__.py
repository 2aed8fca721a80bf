"""depthkit.models."""
