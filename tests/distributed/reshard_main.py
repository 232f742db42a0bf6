"""Run by torchrun in the resharding test: load a checkpoint into this strategy's layout and save
it again at once, so the test can compare what comes out bit for bit.

    torchrun ... tests/distributed/reshard_main.py SPEC.json
    SPEC: {"args": <TrainArgs as a dict>, "load": checkpoint, "save": checkpoint folder, "cache": dir}
"""

import json
import sys
from pathlib import Path

from parallab.config import TrainArgs, from_dict
from parallab.runtime.dist import init_distributed, shutdown
from parallab.train import checkpoint
from parallab.train.trainer import Trainer


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    args = from_dict(TrainArgs, spec["args"])
    info = init_distributed(backend="gloo", timeout_s=120)
    try:
        trainer = Trainer.build(args, info, cache_dir=Path(spec["cache"]))
        meta = checkpoint.load(trainer, checkpoint.resolve(spec["load"]))
        checkpoint.save(trainer, step=meta["step"], ckpt_dir=Path(spec["save"]), losses=meta["losses"])
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    from parallab.runtime.dist import worker_entry

    worker_entry(lambda: main(sys.argv[1]))  # leaves without gloo's teardown, like parallab's workers
