"""Pure tensor code for MMD guidance: kernels, MMD², contributions, gradients, guidance methods.

No I/O, no file paths, no orchestration.
"""
