"""Evaluation: the synthetic task suite and JSONL tasks, answer extractors, exact-match scoring
with intervals and paired tests, token agreement, the ``dyllm bench`` methods table, the
lm-evaluation-harness adapter, and Fast-dLLM's plain-loop baseline the bench times."""
