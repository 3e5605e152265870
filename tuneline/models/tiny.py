"""The offline tiny model: a byte-level BPE tokenizer trained on the corpus and a small random Llama.

Nothing here downloads anything. The tokenizer carries a chat template whose assistant turns sit in
``{% generation %}`` blocks that end with the eos token, so ``return_assistant_tokens_mask=True``
gives a completion-only loss that teaches the model to stop.

Heavy libraries (tokenizers, transformers, torch) are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tuneline.params import TinyModelParams

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
SPECIAL_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT)  # ids 0..5, in this order

# Every role header is a special token, so a turn's content always starts on a token boundary and
# the assistant mask (computed from character offsets) is exact. The eos token closes every
# assistant turn inside the generation block: the model is trained to emit it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT + "' }}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '" + USER + "' }}{{ message['content'] }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '" + SYSTEM + "' }}{{ message['content'] }}"
    "{% else %}"
    "{{ raise_exception('unknown role: ' ~ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)

QUANT_MULTIPLE = 32  # bitsandbytes 4-bit on CPU needs every quantized Linear's out size to be a multiple of this


def train_tokenizer(texts: Iterable[str], params: TinyModelParams) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer of ``params.vocab_size`` tokens (specials included) on ``texts``.

    Deterministic for the same texts and params. The result has bos/eos/pad (pad distinct from eos),
    role markers as special tokens, the chat template, right padding and
    ``model_max_length = params.max_position_embeddings``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # A prefix space on every text segment (each turn's content is its own segment, the role headers
    # being special tokens) gives a word the same token at the start of a turn as inside a sentence:
    # an answer "cat" is "Ġcat", as in the corpus. Digits are single tokens, so a number looks the
    # same after a space, a newline or a comma. The decoder drops the one leading space again.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.tokenizer_min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((t for t in texts if t), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT],
        padding_side="right",
        model_max_length=params.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    for token in SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) is None:  # pragma: no cover - trainer always adds them
            raise RuntimeError(f"special token {token} missing from the trained vocabulary")
    return tokenizer


def linear_out_sizes(params: TinyModelParams) -> dict[str, int]:
    """Output size of every Linear inside a transformer block of the tiny Llama."""
    head_dim = params.hidden_size // params.num_heads
    return {
        "q_proj": params.num_heads * head_dim,
        "k_proj": params.num_kv_heads * head_dim,
        "v_proj": params.num_kv_heads * head_dim,
        "o_proj": params.hidden_size,
        "gate_proj": params.intermediate_size,
        "up_proj": params.intermediate_size,
        "down_proj": params.hidden_size,
    }


def check_quantizable(params: TinyModelParams) -> None:
    """Raise ValueError unless every block Linear's out size is a multiple of 32 (4-bit QLoRA on CPU).

    The tied lm_head is not checked: transformers keeps the output embedding unquantized.
    """
    bad = {name: size for name, size in linear_out_sizes(params).items() if size % QUANT_MULTIPLE}
    if bad:
        detail = ", ".join(f"{name}={size}" for name, size in bad.items())
        raise ValueError(
            f"tiny model shape not quantizable: Linear output sizes must be multiples of {QUANT_MULTIPLE} "
            f"for 4-bit QLoRA on CPU, got {detail} (hidden_size={params.hidden_size}, "
            f"intermediate_size={params.intermediate_size}, num_heads={params.num_heads}, "
            f"num_kv_heads={params.num_kv_heads})"
        )


def tiny_config(tokenizer: Any, params: TinyModelParams) -> Any:
    """The LlamaConfig for ``params`` with the tokenizer's vocabulary and special ids."""
    from transformers import LlamaConfig

    check_quantizable(params)
    head_dim = params.hidden_size // params.num_heads
    if head_dim % 2:
        raise ValueError(f"head dimension {head_dim} must be even for rotary embeddings")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=params.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def init_tiny_model(tokenizer: Any, params: TinyModelParams, seed: int) -> "LlamaForCausalLM":
    """A randomly initialized tiny Llama (fp32, eval mode) for ``tokenizer``; same seed, same weights."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_config(tokenizer, params)
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.tie_weights()
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save model (safetensors only) and tokenizer (with ``chat_template.jinja``) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers 5 writes safetensors only; safe_serialization is kept for readers of older code.
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
