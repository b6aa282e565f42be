"""Bundled model presets: Hugging Face config.json facts, one file per model."""
