"""The defaults of `mae bench`, in a module light enough for the CLI to import at start-up (stdlib only)."""

from __future__ import annotations

DEFAULT_MODEL = "mae_vit_base_patch16"  # a preset: random weights, exported to a temporary bundle
DEFAULT_BATCH_SIZE = 8
DEFAULT_MASK_RATIOS = (0.75, 0.0)
DEFAULT_SECONDS = 5.0  # timing budget per engine and mask ratio
