"""depthkit.losses."""
