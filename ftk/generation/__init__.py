"""`ftk generate`: text from a model (base + adapter or merged), optionally scored by a classifier."""
