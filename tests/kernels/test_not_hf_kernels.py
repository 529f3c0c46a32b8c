"""transformers probes for a package named `kernels` (HF's hub kernels); ours
shares the import name and must never be taken for it."""
import torch


def test_transformers_does_not_take_our_kernels_for_hub_kernels():
    import kernels
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils.import_utils import is_kernels_available

    assert kernels.__file__.endswith("kernels/__init__.py")
    assert not is_kernels_available()
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    logits = LlamaForCausalLM(cfg).eval()(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 32) and torch.isfinite(logits).all()
