"""depthkit.pseudo_label."""
