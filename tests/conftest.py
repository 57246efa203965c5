"""Shared test setup: tools/ on the import path, quiet megatron-core warnings, tiny converted models."""

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
