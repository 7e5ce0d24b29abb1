"""The verbs on scored files: filter, stats, merge, pairs, evaluate, report, card."""
