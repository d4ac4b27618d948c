"""mupgpt: the trainer's parts, one job per module (config, data, optim, engines, checkpoint, metrics)."""
