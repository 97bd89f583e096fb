"""Writing the GGUF file with the `gguf` package (llama.cpp's own gguf-py), as llama.cpp's
convert_hf_to_gguf.py does where it matters: the quant types, tensor names from gguf's TensorNameMap, the
Q/K row permutation of the llama layout, 1-D tensors and norms kept in F32, no output tensor for tied
embeddings, and the rope/norm/context hyper-parameters.
"""

from __future__ import annotations

from pathlib import Path

from finetune_cli.errors import FtuneError
from finetune_cli.export.gguf_vocab import _tokenizer_metadata

# quant name -> (GGMLQuantizationType name, LlamaFileType name, largest mean KL divergence (nats) from the source
# model's next-token distributions the check accepts, least top-1 agreement it accepts at confident positions).
# Measured on the probe text with the SmolLM2-135M quickstart run (README, "What the GGUF check measures"): correct
# files gave mean KL 0.00001 (f16), 0.0002 (bf16), 0.0024 (q8_0), 0.18 (q5_0), 0.63 (q4_0) and agreement 1.0, 1.0,
# 1.0, 0.89, 0.70; broken q8_0 conversions gave mean KL 1.2 (layers 3 and 4's ffn_down swapped) to 7 (q_proj of
# two layers swapped; Q/K permutation skipped: 3.8) and agreement 0.59 down to 0.06. f16 to q8_0 thresholds sit
# about 10x above a correct file, so they catch every broken file measured; 4/5-bit blocks cost a 135M model
# nearly as much as a swap of two middle layers, so their thresholds (about 3x a correct file) catch only grosser
# breakage (permutation, swapped attention or late layers). q5_1 and q4_1 (finer) share q5_0's and q4_0's.
QUANTS = {
    "f32": ("F32", "ALL_F32", 0.001, 0.99),
    "f16": ("F16", "MOSTLY_F16", 0.001, 0.99),
    "bf16": ("BF16", "MOSTLY_BF16", 0.005, 0.98),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", 0.03, 0.98),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0", 0.6, 0.75),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1", 0.6, 0.75),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", 2.0, 0.5),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1", 2.0, 0.5),
}


# model_type -> gguf architecture; llama.cpp converts Mistral with its llama graph (same layout, same permutation)
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}


_PERMUTED = {"llama", "mistral"}  # rotary in the interleaved llama layout: q/k rows reordered as llama.cpp does


def _gguf_name(hf_name: str, tensor_map) -> str:
    name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise FtuneError(f"GGUF export: no GGUF name for tensor {hf_name}")
    return name


def _qtype(gguf_name: str, shape: tuple, quant: str):
    """The GGML type of one tensor: llama.cpp's converter keeps 1-D tensors and norms in F32, and falls back to
    F16 where a row does not split into the quant's blocks."""
    import gguf

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[QUANTS[quant][0]]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _permute(w, n_head: int):
    """llama.cpp's LlamaModel.permute: HF's rotary halves -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, config):
    """(HF name, tensor getter) in the model's order; the tied output head is not written (llama.cpp reuses the
    embedding for it)."""
    tied = getattr(config, "tie_word_embeddings", False)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for hf_name, param in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue

        def get(p=param, n=hf_name):
            w = p.detach().float().cpu().numpy()
            if config.model_type in _PERMUTED and n.endswith("self_attn.q_proj.weight"):
                w = _permute(w, n_head)
            elif config.model_type in _PERMUTED and n.endswith("self_attn.k_proj.weight"):
                w = _permute(w, n_kv)
            return w

        yield hf_name, tuple(param.shape), get


def _write(path: Path, model, config, tokenizer, vocab: dict, quant: str, name: str, found, eot: list[int]) -> dict:
    """Write the file tensor by tensor: every tensor's info first, then each converted and written in turn, so at
    most one converted tensor is in memory besides the model. Returns {gguf name: (shape, type)}."""
    import gguf
    import numpy as np

    arch = gguf.MODEL_ARCH[ARCHS[config.model_type]]
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _metadata(writer, config, quant, name, found)
    _tokenizer_metadata(writer, tokenizer, vocab, eot)
    plan, getters = {}, []
    for hf_name, shape, get in _tensors(model, config):
        gname = _gguf_name(hf_name, tensor_map)
        qtype = _qtype(gname, shape, quant)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(gname, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        plan[gname] = (shape, qtype.name)
        getters.append((get, qtype))
    factors = _rope_factors(config)
    if factors is not None:  # Llama 3.1+: llama.cpp divides each rotary frequency by its factor
        gname = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor_info(gname, factors.shape, factors.dtype, factors.nbytes)
        plan[gname] = (tuple(factors.shape), gguf.GGMLQuantizationType.F32.name)
        getters.append((lambda: factors, gguf.GGMLQuantizationType.F32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for get, qtype in getters:
            data = get()
            if qtype == gguf.GGMLQuantizationType.F32:
                data = data.astype(np.float32)
            elif qtype == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            else:
                data = gguf.quants.quantize(data, qtype)
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return plan


def _rope_factors(config):
    """For llama3 rope scaling, the per-frequency divisors llama.cpp reads from its `rope_freqs` tensor: the
    default inverse frequencies over transformers' own llama3-scaled ones. None for other rope types."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    default = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return (default / scaled.double().numpy()).astype(np.float32)


def _metadata(writer, config, quant: str, name: str, found) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if found.base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(found.base))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
