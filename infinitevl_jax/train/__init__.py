"""Training: mesh and sharding rules, run directories and Orbax checkpoints."""
