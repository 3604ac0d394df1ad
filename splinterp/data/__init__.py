"""Data: MNIST and friends, toy sets, LLM activation harvesting and caching."""
