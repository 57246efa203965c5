"""Planning before paying for nodes: per-GPU memory of a run's phases (``memory.py``)."""
