"""The ground floor: the contracts every component shares (settings, errors, logs, events, the bus and
its client configs, dead letters, data sets, Redis keys, the labelling budget, the A/B experiment store)."""
