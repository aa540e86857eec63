"""odis_core: object-level self-distillation (ODIS) for Vision Transformers.

The library computes and returns values; it never prints (the `odis` CLI does).
"""

__version__ = "0.1.0"
