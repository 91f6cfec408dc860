"""Weight and config conversion between Hugging Face / PyTorch checkpoints and our models."""
