"""ftune: fine-tune Hugging Face causal language models from YAML recipes."""

__version__ = "0.1.0"
