"""embviz: see what compressing a language model's token embeddings does."""

__version__ = "0.1.0"
