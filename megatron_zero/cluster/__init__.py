"""Ray across nodes, below the trainer and the rollout engines: connecting to or starting a cluster, placement
groups whose bundles host the ranks and engines (``placement.py``), and per-node files and ports (``node_files.py``).
"""
