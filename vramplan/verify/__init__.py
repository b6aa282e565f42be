"""vramplan verify: run the reference step on the local GPU and compare with the estimate."""
