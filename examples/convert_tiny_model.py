"""Convert a tiny random Qwen2 model HF -> Megatron -> HF and prove it by logits at TP=2 x PP=2, on CPU.

    python examples/convert_tiny_model.py --output-dir outputs/convert-demo

It runs exactly what a user runs on a real checkpoint (tools/convert_checkpoint.py), on a model
with Qwen2.5-0.5B's awkward parts (QKV bias, tied embeddings, odd vocabulary), in about a minute.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import convert_checkpoint  # noqa: E402

from megatron_zero.models.tiny import save_tiny_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/convert-demo")
    args = parser.parse_args()
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; choose a new --output-dir", file=sys.stderr)
        return 2
    hf_dir = save_tiny_model("qwen2", out / "hf")
    print(f"1/4 wrote tiny Qwen2 HF model to {hf_dir}")
    steps = [
        ("2/4 HF -> Megatron", ["hf-to-mcore", "--hf", str(hf_dir), "--out", str(out / "mcore")]),
        ("3/4 verify logits at TP=2 x PP=2", ["verify", "--hf", str(hf_dir), "--mcore", str(out / "mcore"),
                                              "--tp", "2", "--pp", "2"]),
        ("4/4 Megatron -> HF", ["mcore-to-hf", "--mcore", str(out / "mcore"), "--out", str(out / "hf_back")]),
    ]
    for title, argv in steps:
        print(title, flush=True)
        code = convert_checkpoint.main(argv)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
