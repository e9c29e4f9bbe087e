"""The app's renderers: library results (dataclasses and dicts) turned into the tables and lines a person reads.

The library (core, torch side, runtime, export) returns results and reports progress through callbacks; only the
app layer (this package, `mae.cli`, `mae.demo`, `mae.benchmark`, `mae.weights_info`) prints. See
docs/ARCHITECTURE.md.
"""
