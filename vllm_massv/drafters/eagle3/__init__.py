"""EAGLE-3 (arXiv 2503.01840) heads for vision-language targets, trained by massv and served by
stock vLLM (method `eagle3`, `Eagle3LlamaForCausalLM`): the peer MASSV and MSD are measured
against. The head drafts from three of the target's hidden states and text token embeddings
only; vLLM 0.32 passes it no image embeddings (notes: msd-and-eagle-in-vllm.md §3.2).

- :mod:`vllm_massv.eagle3.config`: the checkpoint contract (speculators `eagle3` format).
- :mod:`vllm_massv.eagle3.model`: the PyTorch twin `Eagle3Drafter` (training-time test unroll).
- :mod:`vllm_massv.eagle3.init`: `init_eagle3_drafter` (`massv init --method eagle3`).

Serving needs no plugin code; on M-RoPE targets the plugin's patch 6 gives the head 1-D absolute
positions (`vllm_massv.eagle_positions`), the stock-bug fix measured in the benchmark.
"""
