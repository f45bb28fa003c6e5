"""Data: tokenizers, the embedded default task behind a small interface, and batching."""
