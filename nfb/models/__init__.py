"""What nfb knows about models, and reads of them before an engine starts: the recipes from
the model cards, SteerLM's prompt format and heads, `ModelFacts` (config, `nfb` key, tokenizer),
the CPU demo model, NeMo checkpoint conversion. No import of nfb.tasks."""
