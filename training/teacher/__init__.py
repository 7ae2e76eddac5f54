"""The teacher: multi-perspective chain-of-thought labels (MPCoT), backends, SFT and DPO."""
