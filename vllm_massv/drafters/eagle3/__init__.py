"""EAGLE-3 (arXiv 2503.01840) heads for vision-language targets: built and trained by massv, served
by stock vLLM (method `eagle3`, `Eagle3LlamaForCausalLM`). Design: docs/design/eagle3.md.

- `config.py`: the checkpoint contract (speculators `eagle3` format).
- `init.py`: `init_eagle3_drafter` (`massv init --method eagle3`).
- `hf_model.py`: the PyTorch twin `Eagle3Drafter` (training-time-test unroll).
- `train.py`: its training setup (batcher, training-time-test loss).

On M-RoPE targets the plugin gives the head 1-D absolute positions
(`vllm_massv/patches/v1_eagle_positions.py`).
"""
