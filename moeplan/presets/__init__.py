"""Model presets: published Hugging Face configs of real MoE models (JSON, package data)."""
