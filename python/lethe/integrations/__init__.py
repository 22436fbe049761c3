"""Integrations with training stacks (Hugging Face models, plain loops)."""
