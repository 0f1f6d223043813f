"""`aic plan`: parameters, FLOPs per token and per-device memory of a spec, counted analytically, before any run."""
