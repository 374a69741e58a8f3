"""TEMPORARY (removed before the layout redesign lands): old module paths -> new modules."""
import importlib
import importlib.abc
import importlib.util
import sys

ALIASES = {
    "vllm_massv.config": "vllm_massv.drafters.massv.config",
    "vllm_massv.projector": "vllm_massv.drafters.massv.projector",
    "vllm_massv.proposer": "vllm_massv.drafters.massv.v1_proposer",
    "vllm_massv.init_drafter": "vllm_massv.drafters.massv.init",
    "vllm_massv.models": "vllm_massv.methods",
    "vllm_massv.models.base": "vllm_massv.drafters.massv.vllm_model",
    "vllm_massv.models.qwen2": "vllm_massv.drafters.massv.vllm_model",
    "vllm_massv.models.gemma3": "vllm_massv.drafters.massv.vllm_model",
    "vllm_massv.hf.base": "vllm_massv.drafters.massv.hf_model",
    "vllm_massv.hf.modeling_massv_qwen2": "vllm_massv.drafters.massv.hf_model",
    "vllm_massv.hf.modeling_massv_gemma3": "vllm_massv.drafters.massv.hf_model",
    "vllm_massv.msd": "vllm_massv.drafters.msd",
    "vllm_massv.msd.config": "vllm_massv.drafters.msd.config",
    "vllm_massv.msd.init": "vllm_massv.drafters.msd.init",
    "vllm_massv.msd.hf_model": "vllm_massv.drafters.msd.hf_model",
    "vllm_massv.msd.model": "vllm_massv.drafters.msd.vllm_model",
    "vllm_massv.msd.proposer": "vllm_massv.drafters.msd.v1_proposer",
    "vllm_massv.eagle3": "vllm_massv.drafters.eagle3",
    "vllm_massv.eagle3.config": "vllm_massv.drafters.eagle3.config",
    "vllm_massv.eagle3.init": "vllm_massv.drafters.eagle3.init",
    "vllm_massv.eagle3.model": "vllm_massv.drafters.eagle3.hf_model",
    "vllm_massv.patch_surface": "vllm_massv.patches.surface_check",
    "vllm_massv.eagle_positions": "vllm_massv.patches.v1_eagle_positions",
    "vllm_massv.distribution": "vllm_massv.patches.vllm_cpu_alias",
    "vllm_massv.training.massv": "vllm_massv.drafters.massv.train",
    "vllm_massv.training.msd": "vllm_massv.drafters.msd.train",
    "vllm_massv.training.eagle3": "vllm_massv.drafters.eagle3.train",
}


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        mod = importlib.import_module(ALIASES[spec.name])
        if spec.name == "vllm_massv.hf.modeling_massv_qwen2":
            from vllm_massv.rope import mrope_positions
            mod.mrope_positions = mrope_positions
        if spec.name == "vllm_massv.eagle_positions":
            from vllm_massv import envs
            mod.STOCK_POSITIONS_ENV = envs.TEST_STOCK_EAGLE_POSITIONS
        return mod

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in ALIASES:
            return importlib.util.spec_from_loader(fullname, _Loader())
        return None


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    from vllm_massv import envs, rope, methods
    from vllm_massv.checkpoint import safetensors_header, local_dir, archs
    from vllm_massv.patches import surface, drafters, engine_config, v1_cpu_sampler
    m = importlib.import_module("vllm_massv.drafters.massv.config")
    m.safetensors_header = safetensors_header
    m._has_mrope = rope.has_mrope
    m._archs = archs
    p = importlib.import_module("vllm_massv.drafters.massv.projector")
    p.expected_projector_weight_names = m.expected_projector_weight_names
    i = importlib.import_module("vllm_massv.drafters.massv.init")
    i._local_dir = local_dir
    pat = importlib.import_module("vllm_massv.patches")
    for mod in (surface, drafters, engine_config, v1_cpu_sampler):
        for k, v in vars(mod).items():
            if not k.startswith("__"):
                setattr(pat, k, getattr(pat, k, v))
    pat.STOCK_PROPOSER_ENV = envs.TEST_STOCK_PROPOSER
    pat.FIX_CPU_SAMPLER_ENV = envs.FIX_CPU_SAMPLER
    methods.MASSV_ARCHITECTURES = methods.METHODS["massv"].vllm_architectures
    methods.MSD_ARCHITECTURES = methods.METHODS["msd"].vllm_architectures
