"""Pretrain a base for LoRA fine-tuning on the Python standard library's source files (no download).

    python launch/pretrain_base.py                       # the built-in base: psilora_ds/assets/stdlib-llama
    python launch/pretrain_base.py --out .cache/base-256x6 --hidden 256 --layers 6 --vocab_size 4096 --steps 3000

Writes the weights, the tokenizer and pretrain.json (how it was made, held-out losses) to --out; a finished
--out is left as it is (delete it to rebuild). See psilora_ds/recipe/pretrain.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

from psilora_ds.recipe.pretrain import PretrainConfig, pretrain_base  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "psilora_ds", "assets", "stdlib-llama"))
    for f in dataclasses.fields(PretrainConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = vars(parser.parse_args())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.pop("out")
    print(json.dumps(pretrain_base(out, PretrainConfig(**args)), indent=1))


if __name__ == "__main__":
    main()
