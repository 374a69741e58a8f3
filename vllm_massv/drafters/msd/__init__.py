"""MSD (arXiv 2505.14260): an EAGLE-style drafter with decoupled visual tokens, served by vLLM's
EAGLE proposer.

- :mod:`vllm_massv.msd.config`: the `msd` config block and the pre-serving pair checks.
- :mod:`vllm_massv.msd.init`: `init_msd_drafter` (`massv init --method msd`).
- :mod:`vllm_massv.msd.model`: the vLLM model `EagleMsdQwen2ForCausalLM`.
- :mod:`vllm_massv.msd.hf_model`: the transformers twin `MsdQwen2Drafter` (training, tests).
"""
