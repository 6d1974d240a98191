"""Export a training run's latest checkpoint as a self-contained model directory.

    python scripts/export_model.py runs/tiny_cpu asarm/models/asarm-tiny

Copies the weights, tokenizer and asarm.json of ``RUN_DIR/checkpoints/latest`` together with the
run's resolved ``config.yaml`` (as ``training_config.yaml``) and ``metrics.jsonl`` (as
``training_log.jsonl``) into DEST, replacing DEST atomically. This is how the embedded default
model ``asarm-tiny`` was produced.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from asarm.training.trainer import latest_checkpoint


def export(run_dir: Path, dest: Path) -> Path:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint (checkpoints/latest)")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(checkpoint / "model", tmp)
    shutil.copy(run_dir / "config.yaml", tmp / "training_config.yaml")
    shutil.copy(run_dir / "metrics.jsonl", tmp / "training_log.jsonl")
    if dest.exists():
        # keep a hand-written model card
        if (dest / "README.md").exists():
            shutil.copy(dest / "README.md", tmp / "README.md")
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    checkpoint = export(args.run_dir, args.dest)
    size = sum(f.stat().st_size for f in args.dest.iterdir())
    print(f"exported {checkpoint} to {args.dest} ({size / 2**20:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
