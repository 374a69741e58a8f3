"""MSD (arXiv 2505.14260): an EAGLE-style drafter with decoupled visual tokens, served by vLLM's
EAGLE proposer. Design: docs/design/msd.md.

- `config.py`: the `msd` config block and the pre-serving checks.
- `init.py`: `init_msd_drafter` (`massv init --method msd`).
- `vllm_model.py`: the vLLM model `EagleMsdQwen2ForCausalLM`.
- `v1_proposer.py`: `MsdEagleProposer`, vLLM's EAGLE proposer for MSD drafters (V1 runner).
- `hf_model.py`: the transformers twin `MsdQwen2Drafter` (training, tests).
- `train.py`: its training setup (batcher, loss, image curriculum).
"""
