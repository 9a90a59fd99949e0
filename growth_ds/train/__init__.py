"""Training data: corpus fetching (``corpus``); tokenizer, token stores, batches (``data``)."""
