"""torch.fx passes that rewrite a dLLM into a cache-backed sparse step (compiler issue)."""
