"""One folder per drafter method, each with the same file set: `config.py` (the checkpoint block
and its pre-serving checks), `init.py` (`massv init --method X`), `vllm_model.py` (the vLLM
model, where the method has its own), `hf_model.py` (the transformers twin), `v1_proposer.py`
(vLLM's V1 model runner, where the method needs its own proposer) and `train.py` (its training
setup). `vllm_massv.methods` registers each method.
"""
