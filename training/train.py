"""Backwards-compatible entry point of `massv train` (kept for `vllm_massv.training.train` imports
and `accelerate launch -m vllm_massv.training.train OUT/train_config.json`).

The training code lives in `loop.py` (the generic accelerate loop, `TrainConfig`, the
`MethodSetup` interface), `examples.py` (training examples), `export.py` (the drafter directory)
and one module per method (`massv.py`, `msd.py`, `eagle3.py`). This module only re-exports
`TrainConfig`, `train`, `Example`, `load_examples` and `split_examples`.
`python -m vllm_massv.training.train OUT/train_config.json` reruns a run from its saved config.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_massv.training.examples import Example, load_examples, split_examples
from vllm_massv.training.loop import TrainConfig, train

__all__ = ["Example", "TrainConfig", "load_examples", "split_examples", "train"]


if __name__ == "__main__":  # `accelerate launch -m vllm_massv.training.train OUT/train_config.json`
    import sys

    train(TrainConfig(**json.loads(Path(sys.argv[1]).read_text())))
