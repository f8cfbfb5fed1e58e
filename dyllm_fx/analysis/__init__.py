"""Looking inside a transformed model: ``explain()`` (what the passes found and each step runs),
per-step saliency traces, and the plots drawn from them and from bench results."""
