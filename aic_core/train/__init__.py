"""Training: what every trainer plugin shares (`common`), checkpoints (`checkpoint`) and the process group
(`distributed`)."""
