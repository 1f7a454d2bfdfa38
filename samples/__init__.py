"""User-facing tools and the embedded default model (8x8 digits)."""
