"""SlimGPT pruning: OBS math (obs), budgets (schedule), methods and the layer-wise engine."""
