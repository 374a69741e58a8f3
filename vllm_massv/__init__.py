"""vllm-massv: multimodal drafters for speculative decoding of vision-language models, as a vLLM
plugin (MASSV, arXiv 2505.10526; MSD, arXiv 2505.14260; EAGLE-3 heads).

Loaded by vLLM through the `vllm.general_plugins` entry point (`massv = vllm_massv:register`) in
every vLLM process. Importing the package needs no vLLM: the transformers side (`massv train`,
the hf twins, the config blocks) works without it; the version gate runs in :func:`register`
and in the commands that start an engine.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM plugin entry point: register every drafter architecture of `vllm_massv.methods` and
    install the patches (`vllm_massv.patches`).

    Re-entrant: vLLM calls it once per process, and calling it again is a no-op. On a vLLM
    series the plugin does not support it logs why and leaves vLLM stock, as vLLM does for a
    plugin that fails to load (`vllm/plugins/__init__.py::load_plugins_by_group`).
    """
    # vLLM is imported here, not at package import: the transformers side runs without it.
    from vllm import ModelRegistry
    from vllm.logger import init_logger

    from vllm_massv import methods, patches

    try:
        patches.surface.check_vllm_version()
    except patches.surface.UnsupportedVllmVersionError as e:
        init_logger("vllm.massv").error("vllm-massv is not loaded: %s", e)
        return
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in methods.vllm_architectures().items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    patches.install()
