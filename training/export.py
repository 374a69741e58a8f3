"""The trained drafter directory every method writes at the end of `massv train`.

One sequence for every method: the method's own weights + `config.json` (its
:meth:`~vllm_massv.training.loop.MethodSetup.save`), then, when it has a checkpoint block (MASSV's
`massv`, MSD's `msd`), the speculators fields with the input drafter's k (so `vllm serve <out>`
serves it with no flags), the tokenizer files and the model card `README.md`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_massv.checkpoint import copy_tokenizer_files
from vllm_massv.speculators import (DEFAULT_NUM_SPECULATIVE_TOKENS,
                                    checkpoint_num_speculative_tokens, speculators_fields)
from vllm_massv.training.model_card import write_model_card

if TYPE_CHECKING:
    import torch

    from vllm_massv.training.loop import MethodSetup, TrainConfig


def export(setup: MethodSetup, model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
           cfg: TrainConfig, out: str | Path, phases: list[dict]) -> None:
    """Write the trained drafter into `out`.

    Args:
        setup: the run's method setup (its `save` and `checkpoint_block` hooks).
        model: the trained drafter, unwrapped from accelerate.
        state_dict: its full weights (gathered under FSDP).
        cfg: the run's config (`drafter`: the input drafter, source of the tokenizer and of k;
            `target`: the verifier when the block names none; `license`: the card's).
        out: the output directory.
        phases: the phase history for the model card.
    """
    out = Path(out)
    setup.save(model, state_dict, out)
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    source = json.loads((Path(cfg.drafter) / "config.json").read_text())
    block = setup.checkpoint_block(model, config, source)
    k = checkpoint_num_speculative_tokens(source) or DEFAULT_NUM_SPECULATIVE_TOKENS
    if block is not None:
        config.update(speculators_fields(block, k, verifier=block.target or cfg.target))
        cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_tokenizer_files(Path(cfg.drafter), out)
    if block is not None:
        write_model_card(out, block, k, phases, license=cfg.license)
