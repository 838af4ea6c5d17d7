"""Local mode: run workflows from files on one machine, no cluster needed."""
