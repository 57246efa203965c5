"""The CPU zero-RL demo's own base model: synthetic addition data, a character-level tokenizer, pretraining.

The shipped assets (a pretrained 0.67M-parameter Qwen2 model with its tokenizer, 2000 RL prompts, 200 held-out
test problems) live in ``assets/``; see assets/README.md for how they were made and the base model's numbers.
This module only names their paths (no imports, no side effects); the code is in corpus.py, tokenizer.py and
pretrain.py, and tools/pretrain_demo_model.py rebuilds the assets.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# Names inside an assets directory (the shipped one or one written by build_demo_assets).
BASE_MODEL_DIR = "base_model"
TRAIN_PROMPTS_FILE = "train_prompts.jsonl"
TEST_PROMPTS_FILE = "test_prompts.jsonl"

BASE_MODEL_PATH = ASSETS_DIR / BASE_MODEL_DIR
TRAIN_PROMPTS_PATH = ASSETS_DIR / TRAIN_PROMPTS_FILE
TEST_PROMPTS_PATH = ASSETS_DIR / TEST_PROMPTS_FILE
