"""Flax NNX ports of BERT, T5 and Llama that load Hugging Face safetensors (and Llama GGUF) checkpoints.

Every dense projection is a plain ``flax.nnx.Linear`` and the NNX attribute tree mirrors the
Hugging Face module tree, so ``".".join(map(str, path))`` of a Linear equals the HF module name
(``encoder.layer.0.attention.self.query``, ``model.layers.0.self_attn.q_proj``,
``encoder.block.0.layer.0.SelfAttention.q`` ...). :data:`DEFAULT_LORA_TARGETS` are regexes on
that dotted path (valid for both ``re.fullmatch`` and ``re.search``), matching PEFT's usual
default targets.
"""

from ._common import (
    ACT_FNS,
    RMSNorm,
    attention,
    get_activation,
    last_token_pooling,
    make_dropout,
    mean_pooling,
)
from .base import HFModule, StaticConfig
from .bert import (
    MINILM_INSTALL_HINT,
    BertForSequenceClassification,
    BertModel,
    BertModelOutput,
    minilm_path,
    sentence_embedding,
)
from .generation import GenerateOutput, generate, sample_logits
from .gguf import (
    SMOLLM2_INSTALL_HINT,
    find_gguf,
    gguf_config,
    gguf_tokenizer,
    read_gguf_tensors,
    smollm2_path,
    unpermute_rotary,
)
from .llama import (
    KVCache,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)
from .rope import apply_rotary, rope_inv_freq
from .hf_names import CheckpointKeyError, hf_param_names, hf_stacked_prefixes, save_hf_checkpoint, to_hf_state_dict
from .loading import MODEL_REGISTRY, load_pretrained, read_safetensors, resolve_model_class
from .t5 import (
    T5EncoderForSequenceClassification,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5Model,
    T5ModelOutput,
    relative_position_bucket,
    shift_right,
)

#: Default LoRA target regexes per ``config.model_type``, on the dotted NNX path (== HF module
#: name). Anchored at both ends, so ``re.fullmatch`` (PEFT / :class:`lorapro_jax.lora.LoraConfig`
#: semantics) and ``re.search`` select the same layers, with or without a task-model prefix such
#: as ``bert.`` or ``model.``. BERT: attention query/value; T5: q/v of self- and cross-attention
#: (PEFT's ``["q", "v"]``); Llama: all attention and MLP projections (not ``lm_head``).
DEFAULT_LORA_TARGETS: dict[str, str] = {
    "bert": r"^(?:.*\.)?attention\.self\.(?:query|value)$",
    "t5": r"^(?:.*\.)?(?:SelfAttention|EncDecAttention)\.(?:q|v)$",
    "llama": r"^(?:.*\.)?(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:gate_proj|up_proj|down_proj))$",
}

__all__ = [
    "ACT_FNS",
    "DEFAULT_LORA_TARGETS",
    "MINILM_INSTALL_HINT",
    "MODEL_REGISTRY",
    "SMOLLM2_INSTALL_HINT",
    "BertForSequenceClassification",
    "BertModel",
    "BertModelOutput",
    "CheckpointKeyError",
    "GenerateOutput",
    "HFModule",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaModel",
    "RMSNorm",
    "StaticConfig",
    "T5EncoderForSequenceClassification",
    "T5EncoderModel",
    "T5ForConditionalGeneration",
    "T5Model",
    "T5ModelOutput",
    "apply_rotary",
    "attention",
    "find_gguf",
    "get_activation",
    "generate",
    "gguf_config",
    "gguf_tokenizer",
    "hf_param_names",
    "hf_stacked_prefixes",
    "last_token_pooling",
    "load_pretrained",
    "make_dropout",
    "mean_pooling",
    "minilm_path",
    "read_gguf_tensors",
    "read_safetensors",
    "relative_position_bucket",
    "resolve_model_class",
    "rope_inv_freq",
    "sample_logits",
    "save_hf_checkpoint",
    "sentence_embedding",
    "shift_right",
    "smollm2_path",
    "to_hf_state_dict",
    "unpermute_rotary",
]
