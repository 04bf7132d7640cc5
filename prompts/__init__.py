"""Shipped prompt files (data, loaded with lesiongen.data.prompts.load_prompts)."""
