"""vllm-massv: MASSV speculative decoding for vision-language models, as a vLLM plugin.

MASSV (arXiv 2505.10526) turns a small text LM into a multimodal drafter: a projector maps the
target VLM's image embeddings into the drafter's embedding space. This package registers the
drafter architectures with vLLM and makes vLLM's `draft_model` speculative decoding feed them the
target's cached image embeddings, with correct positions and draft KV slots.

Loaded by vLLM through the `vllm.general_plugins` entry point (`massv = vllm_massv:register`) in
every vLLM process.
"""

from vllm_massv.patches import check_vllm_version

__version__ = "0.1.0"

check_vllm_version()


def register() -> None:
    """vLLM plugin entry point: register the MASSV and MSD drafter architectures and install the
    proposer patches.

    Re-entrant: vLLM calls it once per process, and calling it again is a no-op.
    """
    from vllm import ModelRegistry

    from vllm_massv import patches
    from vllm_massv.models import MASSV_ARCHITECTURES, MSD_ARCHITECTURES

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in {**MASSV_ARCHITECTURES, **MSD_ARCHITECTURES}.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    patches.install()
