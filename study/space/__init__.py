"""The search space and how it is searched: the parameter space from the config, the baselines, samplers and pruners,
per-trial sampler seeds and the pruning decision points."""
