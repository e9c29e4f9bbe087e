"""Inference on exported bundles with numpy + Pillow and one engine. Never imports torch at module level."""
