"""Tiny random models and a word-level tokenizer with a chat template, built offline in tests.

    path = save_tiny_causal_lm(tmp_path / "m")       # a local model directory, loadable by ModelSpec
    model = build("mixtral")                          # a random model of one of ARCHITECTURES
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a an is are was be to of and in that it for on with as at by this from or not but what "
    "which who how why when where answer question model good bad yes no paris france capital le la "
    "les de est une un et qui que bonjour merci write poem short explain list three"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


VOCAB = len(SPECIALS) + len(WORDS)
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, num_labels=1, pad_token_id=0)


def _recipes():
    """name -> (auto class, config class, config kwargs): configs are built with overrides merged,
    so derived sizes (head_dim) follow an overridden hidden_size."""
    import transformers as t

    return {
        "llama": (t.AutoModelForCausalLM, t.LlamaConfig, dict(_DECODER, tie_word_embeddings=True)),
        "mistral": (t.AutoModelForCausalLM, t.MistralConfig, _DECODER),
        "qwen2": (t.AutoModelForCausalLM, t.Qwen2Config, _DECODER),
        "mixtral": (t.AutoModelForCausalLM, t.MixtralConfig, dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)),
        "mamba": (t.AutoModelForCausalLM, t.MambaConfig, dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                              state_size=4, expand=2, pad_token_id=0)),
        "jamba": (t.AutoModelForCausalLM, t.JambaConfig, dict(_DECODER, num_experts=2, num_experts_per_tok=1,
                                                              attn_layer_period=2, attn_layer_offset=1,
                                                              expert_layer_period=2, expert_layer_offset=1,
                                                              mamba_d_state=4, mamba_dt_rank=4)),
        "bert": (t.AutoModelForSequenceClassification, t.BertConfig, _ENCODER),
        "deberta-v2": (t.AutoModelForSequenceClassification, t.DebertaV2Config, _ENCODER),
        "camembert": (t.AutoModelForSequenceClassification, t.CamembertConfig, _ENCODER),
        "t5": (t.AutoModelForSeq2SeqLM, t.T5Config, dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                         num_heads=4, pad_token_id=0, decoder_start_token_id=0)),
        "llama-reward": (t.AutoModelForSequenceClassification, t.LlamaConfig, dict(_DECODER, num_labels=1)),
    }


ARCHITECTURES = tuple(_recipes())


def build(name: str, seed: int = 0, **overrides):
    auto, config_class, kwargs = _recipes()[name]
    torch.manual_seed(seed)
    return auto.from_config(config_class(**{**kwargs, **overrides}))


def save_tiny_causal_lm(path: Path, name: str = "llama", seed: int = 0, **overrides) -> Path:
    model = build(name, seed=seed, **overrides)
    if model.can_generate():
        # A random model would often stop at once or emit markup; words only, up to the budget.
        model.generation_config.suppress_tokens = list(range(len(SPECIALS)))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
