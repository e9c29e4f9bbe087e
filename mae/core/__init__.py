"""The torch-free base every other part uses: errors, the model configuration, the file layer, and the contracts
between the parts (masking, patches, pre-processing, the bundle and its integrity, reconstruction panels, what the
CPU and GPU can do). numpy, Pillow and the standard library only; it imports no other part of mae.
See docs/ARCHITECTURE.md.
"""
