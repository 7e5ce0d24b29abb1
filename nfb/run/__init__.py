"""The run: one task over one dataset on one engine, with restarts, resume and the final merge."""
