"""`ftk evaluate`: perplexity (sliding window), masked-LM accuracy and pseudo-perplexity, classification
metrics, in-context learning by verbalizer log-likelihood, and forgetting against a second model."""
