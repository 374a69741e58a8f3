"""MASSV training pipeline (installed as `vllm_massv.training`).

1. `massv generate` (`generate.py`): self-distillation data — the target answers image prompts
   through vLLM's offline engine; Parquet shards.
2. `massv train --phase align` (`massv.py`): projector alignment on image-caption data, LM frozen.
3. `massv train --phase sdvit`: self-distilled visual instruction tuning, projector + LM, on the
   target's own responses.
The output is a drafter directory the plugin serves (MASSV, arXiv 2505.10526 §3.2).
`massv train --method msd` / `eagle3` (`msd.py`, `eagle3.py`) train the other drafters with the
same loop (`loop.py`), examples (`examples.py`) and export (`export.py`).
"""
