"""What every model-using stage shares: families and chat rendering, BOS/stop rules, the prompt-drift
check, offline LMs and text encoders, devices, hub resolution and one training loop."""
