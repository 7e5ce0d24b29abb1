"""What nfb knows about models: prompt formats (SteerLM) and NeMo checkpoint conversion."""
