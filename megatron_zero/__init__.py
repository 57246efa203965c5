"""megatron-zero: zero-RL training of base LLMs with a megatron-core actor and SGLang rollouts.

Importing the package has no side effects; subpackages are imported where they are used.
"""

__version__ = "0.1.0"
