"""One import namespace: every module is `wallperf.<package>`, no bare top-level
name of ours is importable, Hugging Face's `kernels` (which transformers 5
imports at start-up) is never shadowed, and setup.cfg's package list is the tree."""
import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _in_child(code: str, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_bare_kernels_is_never_ours(where, tmp_path):
    """From the checkout's root (on sys.path as '') and from another folder."""
    cwd = REPO if where == "repo" else tmp_path
    found = _in_child(
        "import importlib.util, json\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'origin': spec and spec.origin, 'locations': list(spec.submodule_search_locations or []) if spec else []}))",
        cwd)
    ours = str(REPO / "kernels")
    if found["origin"] is None and found["locations"] == [ours]:
        pytest.fail("`import kernels` gives the repository's kernels/ folder")
    assert found["origin"] is None or not found["origin"].startswith(ours)
    hf = importlib_metadata_has("kernels")
    if hf:
        assert found["origin"] and "site-packages" in found["origin"], found


def importlib_metadata_has(dist: str) -> bool:
    from importlib import metadata
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("bare", ["sut", "harness", "audit", "cli", "driver"])
def test_no_other_top_level_name_is_a_package_of_ours(bare, tmp_path):
    found = _in_child(f"import importlib.util, json; s = importlib.util.find_spec({bare!r}); "
                      "print(json.dumps(None if s is None else str(s.origin or list(s.submodule_search_locations))))",
                      tmp_path)
    assert found is None or str(REPO) not in found


def test_transformers_runs_beside_wallperf_kernels():
    import wallperf.kernels.dispatch  # noqa: F401  (ours, under its own name)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    logits = LlamaForCausalLM(cfg).eval()(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 32) and torch.isfinite(logits).all()


def test_setup_cfg_lists_every_package_folder():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    opts = cfg["options"]
    mapping = dict(line.split(" = ") for line in opts["package_dir"].strip().splitlines())
    listed = set(opts["packages"].split())
    on_disk = set()
    for package, folder in mapping.items():
        for d in [REPO / folder, *(p for p in (REPO / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts:
                continue
            if any(d.glob("*.py")) or package == "wallperf.conf" and d == REPO / folder:
                rel = d.relative_to(REPO / folder).parts
                on_disk.add(".".join((package,) + rel))
    assert listed == on_disk


def test_package_data_is_found_where_the_code_looks():
    from wallperf.audit import report
    from wallperf.harness.config.checks import conf_dir
    from wallperf.kernels import cpu_linear

    assert (conf_dir() / "models" / "smollm2-135m.yaml").is_file()
    assert all(p.is_file() for p in cpu_linear._SOURCES)
    assert (report.TEMPLATES / "report.html.j2").is_file()
