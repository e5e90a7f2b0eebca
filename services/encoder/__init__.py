"""The encoder service: turns prompts into text embeddings, the first stage of every job."""
