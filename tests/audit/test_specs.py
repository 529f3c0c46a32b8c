"""Model specs: the grammar, short dtype names, and fp8 in the variant of the hardware named."""
import pytest
import torch

from wallperf.audit.specs import AuditInputError, ModelSpec, fp8_format, load_spec, parse_spec, resolve_spec
from wallperf.harness.config import load_hardware_config


@pytest.mark.parametrize("spec,message", [
    ("", "empty"),
    ("smollm2-135m@int4", "dtype 'int4' is not one of"),
    ("smollm2-135m+noise0", "must be a number > 0"),
    ("smollm2-135m@bfloat16+noisex", "must be a number > 0"),
])
def test_bad_spec_syntax(spec, message):
    with pytest.raises(AuditInputError, match=message):
        parse_spec(spec)


def test_spec_grammar():
    assert parse_spec("smollm2-135m") == ModelSpec("smollm2-135m", None, 0.0)
    s = parse_spec("/tmp/a@b/model.gguf@fp8+noise0.05")
    assert (s.target, s.dtype, s.noise) == ("/tmp/a@b/model.gguf", "fp8", 0.05)
    assert str(parse_spec("m@float32+noise0.2")) == "m@float32+noise0.2"


@pytest.mark.parametrize("short,full", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"),
                                        ("bfloat16", "bfloat16"), ("fp8_e4m3fnuz", "fp8_e4m3fnuz")])
def test_short_dtype_names(short, full):
    assert parse_spec(f"smollm2-135m@{short}").dtype == full


@pytest.mark.parametrize("hardware,expected", [("mi300x", torch.float8_e4m3fnuz), ("h100-sxm", torch.float8_e4m3fn),
                                               ("h200", torch.float8_e4m3fn), ("cpu", torch.float8_e4m3fn)])
def test_fp8_follows_the_hardware(hardware, expected):
    profile = load_hardware_config(hardware)
    assert fp8_format("fp8", profile) == (expected, "bfloat16")
    # A variant named outright wins over the hardware's.
    assert fp8_format("fp8_e4m3fnuz", profile)[0] == torch.float8_e4m3fnuz
    assert fp8_format("fp8_e4m3fn", profile)[0] == torch.float8_e4m3fn
    assert fp8_format("float32", profile) == (None, "float32")


@pytest.mark.parametrize("target,message", [
    ("no-such-model", "neither a model name from conf/models"),
    ("llama3.1-8b", "cannot be audited: .*synthetic weights"),
])
def test_unresolvable_spec(target, message):
    with pytest.raises(AuditInputError, match=message):
        resolve_spec(parse_spec(target))


def test_fp8_spec_loads_the_hardware_variant(tiny_llama_folder):
    loaded = load_spec(parse_spec(f"{tiny_llama_folder}@fp8"), load_hardware_config("mi300x"), device="cpu")
    assert loaded.quantization["fp8_format"] == "fp8_e4m3fnuz"
    weights = {p.dtype for n, p in loaded.model.named_buffers()} | {p.dtype for p in loaded.model.parameters()}
    assert torch.float8_e4m3fnuz in weights and torch.float8_e4m3fn not in weights
