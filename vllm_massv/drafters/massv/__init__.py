"""MASSV (arXiv 2505.10526): a small text LM turned into a multimodal drafter by a projector from
the target's cached image embeddings, served by vLLM's `draft_model` method.

- `config.py`: the `massv` block, the pairing and weight checks.
- `projector.py`: the projector kinds (shared by both twins).
- `init.py`: `massv init` (Qwen2-VL / Qwen2.5-VL with Qwen2 LMs, Gemma3 with Gemma3 text LMs).
- `vllm_model.py`: the vLLM drafters `MassvQwen2ForCausalLM`, `MassvGemma3ForCausalLM`.
- `hf_model.py`: their transformers twins (training, reference computations).
- `v1_proposer.py`: `MassvDraftModelProposer` (V1 model runner).
- `train.py`: phase 1 (projector alignment) and phase 2 (self-distilled visual instruction tuning).

Design: docs/design/massv.md.
"""
