"""Root pytest configuration: applies to the doctests in ``pyro_ebm/`` as well as ``tests/``."""

import torch

# On 2 cores, two intra-op threads make small matmuls many times slower (DESIGN.md §6).
torch.set_num_threads(1)
