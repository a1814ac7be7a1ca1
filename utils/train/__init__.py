"""The training wing: the configuration and recipes, one step and its exemplars, bad steps,
checkpointed state, distributed runs, the Trainer."""
