"""`wallperf export-gguf`: a GGUF model's weights rewritten as a BF16 GGUF.

The native engine dequantizes a GGUF on load and runs it in bf16; llama.cpp
runs a GGUF as stored. To compare the two on the same numbers, this writes the
weights the native engine holds in bf16 as a BF16 GGUF: every 2-D tensor
dequantized with the `gguf` package and rounded to bfloat16 (round to nearest
even, as torch's `.to(torch.bfloat16)` does), 1-D tensors (the norms) kept in
float32 as llama.cpp's own converter keeps them. Tensor names, order and
layout (llama.cpp's interleaved Q/K rows) are the source's; so are the
metadata and the tokenizer, except general.file_type, which says BF16.

Tensors are converted and written one at a time (the writer is given every
tensor's shape first), so memory holds one tensor, not the model. The file is
written beside its destination under a temporary name and renamed when
complete. Without --out it is cached under $WALLPERF_CACHE/gguf, named by the
source's sha256, and reused.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from wallperf.harness.artifacts import cache_dir, sha256_file
from wallperf.harness.config import ConfigError
from wallperf.sut.atomic import atomic_path

EXPORT_DTYPES = ("bf16",)
# Keys the writer sets itself, or that describe the source's own encoding.
_WRITER_KEYS = ("general.architecture", "general.file_type", "general.alignment")


def cached_export_path(source: Path, dtype: str = "bf16") -> Path:
    """Where the export of `source` is cached: keyed by its content, not its name."""
    return cache_dir() / "gguf" / f"{source.stem}.{sha256_file(source)[:16]}.{dtype}.gguf"


def export_gguf(source: Path, dest: Path, dtype: str = "bf16") -> Path:
    """Write `source`'s weights to `dest` as a `dtype` GGUF (atomically); returns `dest`."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize, quantize

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; allowed: {', '.join(EXPORT_DTYPES)}")
    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        writer = GGUFWriter(str(tmp), arch)
        alignment = reader.fields.get("general.alignment")
        if alignment is not None:
            writer.add_custom_alignment(int(alignment.contents()))
        for name, f in reader.fields.items():
            if name.startswith("GGUF.") or name in _WRITER_KEYS:
                continue
            sub_type = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, f.contents(), f.types[0], sub_type)
        writer.add_file_type(LlamaFileType.MOSTLY_BF16)

        def target(t) -> GGMLQuantizationType:
            return GGMLQuantizationType.F32 if len(t.shape) == 1 else GGMLQuantizationType.BF16

        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))  # numpy order: (rows, cols)
            qtype = target(t)
            itemsize = 4 if qtype == GGMLQuantizationType.F32 else 2
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * itemsize,
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            weights = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            writer.write_tensor_data(np.ascontiguousarray(quantize(weights, target(t))))
        writer.close()
    return dest


def bf16_gguf(source: Path) -> Path:
    """The cached BF16 export of `source`, written on first use."""
    dest = cached_export_path(Path(source))
    if not dest.is_file():
        _say(f"writing a BF16 GGUF of {Path(source).name} to {dest} (once)")
        export_gguf(Path(source), dest)
    return dest


def add_export_parser(subparsers):
    p = subparsers.add_parser(
        "export-gguf", help="write a GGUF model's weights as a BF16 GGUF (for the llamacpp backend)",
        description="Dequantize a GGUF model (e.g. SmolLM2's Q4_1) and write the weights the native engine "
                    "runs in bf16 as a BF16 GGUF, with the source's metadata and tokenizer, so llama.cpp runs "
                    "the same numbers. Without --out, the file is cached under $WALLPERF_CACHE/gguf and "
                    "reused; `wallperf run --backend llamacpp --gguf bf16` uses that cached file.")
    p.add_argument("--model", default="smollm2-135m", help="model name from conf/models (a GGUF model), "
                   "or a .gguf file")
    p.add_argument("--dtype", default="bf16", choices=EXPORT_DTYPES, help="dtype of the 2-D tensors (default bf16)")
    p.add_argument("--out", type=Path, help="output .gguf file (default: the cache)")
    return p


def source_gguf(model: str) -> Path:
    """A model name from conf/models whose format is gguf, or a .gguf file, as a resolved file."""
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config import load_model_config

    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError("command line", "--model", f"{path}: file not found")
        return path
    cfg = load_model_config(model, "command line", "--model")
    if cfg.format != "gguf":
        raise ConfigError(f"conf/models/{model}.yaml", "format",
                          f"{cfg.format!r}: only a GGUF model can be exported to a GGUF")
    return resolve_model_file(cfg)


def cmd_export_gguf(args) -> int:
    source = source_gguf(args.model)
    if args.out is None:
        dest = bf16_gguf(source)
    else:
        if args.out.suffix != ".gguf":
            raise ConfigError("command line", "--out", f"{args.out}: expected a .gguf file name")
        dest = export_gguf(source, args.out, args.dtype)
    print(dest)
    return 0


def _say(msg: str) -> None:
    print(f"wallperf: {msg}", file=sys.stderr, flush=True)
