"""Print a demo run's before/after table (megatron_zero/demo/story.py) as JSON and as a Markdown table.

    python tools/demo_story.py /tmp/demo            # means over the first and the last 5 steps
    python tools/demo_story.py /tmp/demo --window 10
"""

from __future__ import annotations

import argparse
import json

from megatron_zero.demo.story import demo_story


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the demo's --output-dir")
    parser.add_argument("--window", type=int, default=5, help="steps averaged at each end")
    args = parser.parse_args()
    story = demo_story(args.out_dir, args.window)
    print(json.dumps(story, indent=2))
    first, last = story["first"], story["last"]
    print(f"\n| measure | steps {story['first_steps'][0]}-{story['first_steps'][-1]} | "
          f"steps {story['last_steps'][0]}-{story['last_steps'][-1]} |\n|---|---|---|")
    for name in first:
        cells = ["-" if v is None else f"{v:.3f}" if abs(v) < 2 else f"{v:.1f}" for v in (first[name], last[name])]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    print("\nheld-out (greedy): " + ", ".join(f"step {e['step']}: {e['accuracy']:.3f}" for e in story["held_out"]))


if __name__ == "__main__":
    main()
