"""Model card templates, filled on save_pretrained and push_to_hub."""
