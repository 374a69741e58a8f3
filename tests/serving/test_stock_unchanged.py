"""With the plugin installed, a stock (non-MASSV) draft config behaves exactly like stock vLLM.

Both runs happen in fresh subprocesses; the second sets `VLLM_PLUGINS` so that vLLM does not
load the plugin in any process. Same outputs, same spec-decode counters. The stock drafter here
has the sanity drafter's weights, and the numbers also document why the plugin exists: stock
`draft_model` accepts next to nothing on image prompts.

Which configs the plugin changes and which it leaves stock (README, "Which configs it changes,
exactly"), patch by patch and without an engine: `tests/unit/test_stock_scope.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
sys.path.insert(0, {repo_dir!r})
from tests.support.engine import (IMAGE_PROMPTS, acceptance, engine, generate, mixed_batch,
                                  spec_counters, token_ids)
from pathlib import Path

def main():
    target, draft = Path({target!r}), Path({draft!r})
    with engine(target, {{"method": "draft_model", "model": str(draft),
                          "num_speculative_tokens": 3}}) as llm:
        outs = generate(llm, mixed_batch(target))
        counters = spec_counters(llm)
    print("RESULT" + json.dumps({{"ids": token_ids(outs), "counters": counters,
        "image_acceptance": acceptance(outs, IMAGE_PROMPTS),
        "text_acceptance": acceptance(outs, ["text"]),
        "plugin_loaded": any(type(f).__name__ == "PostImportHook" for f in sys.meta_path)}}))

if __name__ == "__main__":
    main()
"""


def run(models, tmp_path: Path, plugins: str | None) -> dict:
    script = tmp_path / f"run_{plugins or 'default'}.py"
    script.write_text(SCRIPT.format(repo_dir=str(Path(__file__).parents[2]),
                                    target=str(models.target), draft=str(models.stock)))
    env = dict(os.environ)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT"):]) | {"log": proc.stderr}


@pytest.mark.slow
def test_stock_draft_config_is_untouched(models, tmp_path):
    with_plugin = run(models, tmp_path, None)
    without_plugin = run(models, tmp_path, "lora_filesystem_resolver")
    assert with_plugin["plugin_loaded"] and not without_plugin["plugin_loaded"]
    assert "MASSV" not in with_plugin["log"]  # no MASSV code path was taken
    assert with_plugin["ids"] == without_plugin["ids"]
    assert with_plugin["counters"] == without_plugin["counters"]
    print(f"stock draft_model, same weights as the sanity drafter: acceptance on image prompts "
          f"{with_plugin['image_acceptance']:.3f}, text {with_plugin['text_acceptance']:.3f}")
    assert with_plugin["image_acceptance"] < 0.2
