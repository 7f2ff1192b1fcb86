"""sglang-psa: Progressive Sparse Attention decode for SGLang (`--attention-backend psa`).

Importing this package is cheap; SGLang loads `sglang_psa.plugin:register` through its plugin entry
points. Kernels live in `sglang_psa.kernels`, memory pools in `sglang_psa.memory`.
"""

from .config import PSAConfig

__all__ = ["PSAConfig"]
__version__ = "0.1.0"
