"""Build the CPU demo's assets (tokenizer, teacher, student, data); optionally check learnability.

    python tools/build_demo.py [OUT_DIR] [--seed N] [--force] [--simulate [--steps N --batch-size N --lr X]]

``--simulate`` runs the pure-torch reference ExOPD loop (``megatron_opd.demo.simulate``) and prints the
teacher's and the student's held-out accuracy before and after; ``--json PATH`` saves that report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from megatron_opd.demo.build import build_demo_assets
from megatron_opd.demo.reference_opd import OPDRecipe
from megatron_opd.demo.simulate import simulate


def main(argv: list[str] | None = None) -> int:
    defaults = OPDRecipe()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", default="runs/demo_assets", help="where to write (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="shifts every model seed (0: the documented build)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    ap.add_argument("--simulate", action="store_true", help="run the reference ExOPD check afterwards")
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--eval-split", choices=("val", "test"), default="test")
    ap.add_argument("--n-eval", type=int, default=None, help="evaluate on the first N problems (default: all)")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the simulation report here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    assets = build_demo_assets(args.out_dir, seed=args.seed, force=args.force)
    manifest = assets.read_manifest() or {}
    print(f"assets in {assets.root} (recipe {manifest.get('recipe_hash')}, built in {manifest.get('build_s')} s)")
    print(json.dumps(manifest.get("measured", {}), sort_keys=True))
    if args.simulate:
        recipe = OPDRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
        report = simulate(assets, recipe, args.eval_split, args.n_eval, args.eval_every)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
