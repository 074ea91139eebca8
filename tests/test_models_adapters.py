"""Adapters on tiny random models of every architecture in scope: targets found, attached, trainable."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from alignment.models import (
    AdapterConfig,
    ModelError,
    ModelSpec,
    PolicyPool,
    apply_adapter,
    find_targets,
    load_adapter,
    load_model,
    save_adapter,
)
from tests.tiny_models import ARCHITECTURES, build, save_tiny_causal_lm

EXPECTED = {
    "llama": ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, set()),
    "mistral": ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, set()),
    "qwen2": ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, set()),
    "mixtral": ({"q_proj", "k_proj", "v_proj", "o_proj"},
                {"experts.gate_up_proj", "experts.down_proj", "gate.weight"}),
    # dt_proj's weight is used directly by the mixer (a LoRA there would never act) and peft
    # refuses out_proj on Mamba: see alignment.models.adapters
    "mamba": ({"in_proj", "x_proj"}, set()),
    "jamba": ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "in_proj", "x_proj", "out_proj"},
              {"experts.gate_up_proj", "experts.down_proj", "router.weight"}),
    "bert": ({"query", "key", "value", "dense"}, set()),
    "deberta-v2": ({"query_proj", "key_proj", "value_proj", "dense"}, set()),
    "camembert": ({"query", "key", "value", "dense"}, set()),
    "t5": ({"q", "k", "v", "o", "wi", "wo"}, set()),
    "llama-reward": ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, set()),
}
IDS = torch.tensor([[2, 9, 10, 11, 12, 13], [2, 14, 15, 16, 17, 18]])


def loss_of(model) -> torch.Tensor:
    """A loss that reaches every layer, whatever the head."""
    kwargs = {"input_ids": IDS}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = IDS
    return model(**kwargs).logits.float().pow(2).mean()


def assert_trains_only_adapter(model, cfg_heads=()) -> None:
    loss_of(model).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora_b = {n: p for n, p in trainable.items() if "lora_B" in n}
    assert lora_b, "no LoRA layers were attached"
    for name, param in lora_b.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
    others = [n for n in trainable if "lora_" not in n and not any(f".{h}." in n for h in cfg_heads)]
    assert not others, f"base parameters left trainable: {others[:5]}"


def test_every_architecture_in_scope_is_covered():
    assert set(EXPECTED) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_targets_attach_and_backpropagate(arch):
    model = build(arch)
    modules, parameters = EXPECTED[arch]
    targets = find_targets(model)
    assert set(targets.modules) == modules
    assert set(targets.parameters) == parameters
    # dropout 0 lets peft adapt fused MoE experts as well (its parameter wrapper refuses dropout)
    peft_model = apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8, dropout=0.0))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert modules <= wrapped | {p.split(".")[0] for p in parameters}
    assert_trains_only_adapter(peft_model, targets.heads)


@pytest.mark.parametrize("arch", ["bert", "deberta-v2", "llama-reward"])
def test_reward_heads_are_trained_in_full(arch):
    peft_model = apply_adapter(build(arch), AdapterConfig(r=4, dropout=0.0))
    heads = find_targets(build(arch)).heads
    assert heads
    loss_of(peft_model).backward()
    for head in heads:
        grads = [p.grad for n, p in peft_model.named_parameters() if f".{head}." in n and "modules_to_save" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), head
    # no LoRA inside a fully trained head (DeBERTa's pooler.dense shares the name 'dense')
    assert not [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and any(f".{h}." in n + "." for h in heads)]


def test_moe_experts_stay_frozen_with_dropout_and_say_so(caplog):
    with caplog.at_level(logging.WARNING):
        peft_model = apply_adapter(build("mixtral"), AdapterConfig(r=4, dropout=0.1))
    assert "stay frozen" in caplog.text
    wrappers = [type(m).__name__ for m in peft_model.modules()]
    assert "ParamWrapper" not in wrappers
    assert_trains_only_adapter(peft_model)


def test_dora_attaches_magnitude_vectors():
    peft_model = apply_adapter(build("llama"), AdapterConfig(method="dora", r=4))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    assert_trains_only_adapter(peft_model)


def test_full_fine_tuning_trains_everything():
    model = apply_adapter(build("llama"), AdapterConfig(method="full"))
    loss_of(model).backward()
    assert all(p.requires_grad and p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpointing_goes_through_transformers_current_api(method):
    """Activations are recomputed (the layers say so) and the gradients still reach the weights,
    without transformers' deprecation warning for the old `gradient_checkpointing_enable`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_adapter(build("llama"), AdapterConfig(method=method, r=4, gradient_checkpointing=True))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.is_gradient_checkpointing
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
    model.train()
    loss_of(model).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lm_head_only_unties_and_leaves_embeddings_alone(tmp_path):
    model = build("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like SmolLM2
    embeddings = model.model.embed_tokens.weight.detach().clone()
    model = apply_adapter(model, AdapterConfig(method="lm_head"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss_of(model).backward()
    optimizer.step()
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert not torch.equal(model.lm_head.weight, embeddings)
    assert save_adapter(model, tmp_path / "head") == "lm_head"
    reloaded = load_adapter(build("llama"), tmp_path / "head")
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, model(IDS).logits, atol=1e-5)


def _train_lora(model, cfg=None, seed=1):
    """A LoRA adapter with random (non-zero) B matrices: a stand-in for a trained one."""
    peft_model = apply_adapter(model, cfg or AdapterConfig(r=4, alpha=8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return peft_model


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_causal_lm(tmp_path / "base")


def test_saved_lora_loads_back_through_model_spec(tiny_dir, tmp_path):
    base, _ = load_model(ModelSpec(str(tiny_dir)))
    trained = _train_lora(base).eval()
    save_adapter(trained, tmp_path / "adapter")
    with torch.no_grad():
        expected = trained(IDS).logits
    model, tokenizer = load_model(ModelSpec(str(tiny_dir), adapter_path=str(tmp_path / "adapter")))
    assert tokenizer.pad_token is not None
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, expected, atol=1e-5)
        plain, _ = load_model(ModelSpec(str(tiny_dir)))
        assert not torch.allclose(plain(IDS).logits, expected, atol=1e-3)


def test_adapter_that_does_not_fit_its_base_is_refused(tiny_dir, tmp_path):
    other = save_tiny_causal_lm(tmp_path / "wide", hidden_size=64)
    wide, _ = load_model(ModelSpec(str(other)))
    save_adapter(_train_lora(wide), tmp_path / "wide-adapter")
    with pytest.raises(ModelError, match="does not fit this base model") as info:
        load_model(ModelSpec(str(tiny_dir), adapter_path=str(tmp_path / "wide-adapter")))
    assert "\n" not in str(info.value)
    mamba = build("mamba")
    save_adapter(_train_lora(mamba), tmp_path / "mamba-adapter")
    with pytest.raises(ModelError, match="does not fit this base model"):
        load_model(ModelSpec(str(tiny_dir), adapter_path=str(tmp_path / "mamba-adapter")))
    with pytest.raises(ModelError, match="not a saved adapter"):
        load_model(ModelSpec(str(tiny_dir), adapter_path=str(tmp_path)))


@pytest.fixture
def tiny_dir_64(tmp_path):
    # bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 input features
    return save_tiny_causal_lm(tmp_path / "base64", hidden_size=64, intermediate_size=128)


def test_4bit_on_cpu_forwards_generates_and_trains(tiny_dir_64):
    from bitsandbytes.nn import Linear4bit

    tiny_dir = tiny_dir_64
    model, tokenizer = load_model(ModelSpec(str(tiny_dir), quantize="4bit", device="cpu"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, IDS.shape[1] + 4)
    # generate() above made bitsandbytes repack the weights for its backward-less CPU kernel;
    # apply_adapter must undo that or no gradient reaches the first layers (PPO's pattern).
    peft_model = apply_adapter(model, AdapterConfig(r=4, dropout=0.0))
    assert_trains_only_adapter(peft_model)
    with pytest.raises(ModelError, match="full fine-tuning needs an unquantized model"):
        apply_adapter(load_model(ModelSpec(str(tiny_dir), quantize="4bit"))[0], AdapterConfig(method="full"))


def test_8bit_on_cpu_forwards(tiny_dir):
    from bitsandbytes.nn import Linear8bitLt

    model, _ = load_model(ModelSpec(str(tiny_dir), quantize="8bit", device="cpu"))
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear8bitLt)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_auto_quantization_is_none_on_cpu(tiny_dir):
    from alignment.models import is_quantized, resolve_quantize

    spec = ModelSpec(str(tiny_dir), device="cpu")
    assert resolve_quantize(spec) == "none"
    assert not is_quantized(load_model(spec)[0])


def test_policy_pool_switches_adapters_on_one_base(tiny_dir, tmp_path):
    for seed, name in [(1, "a"), (2, "b")]:
        base, _ = load_model(ModelSpec(str(tiny_dir)))
        save_adapter(_train_lora(base, seed=seed), tmp_path / name)
    head_model = apply_adapter(load_model(ModelSpec(str(tiny_dir)))[0], AdapterConfig(method="lm_head"))
    with torch.no_grad():
        head_model.lm_head.weight.mul_(-1.0)
    save_adapter(head_model, tmp_path / "head")

    def logits(spec_adapter):
        model, _ = load_model(ModelSpec(str(tiny_dir), adapter_path=spec_adapter))
        with torch.no_grad():
            return model(IDS).logits

    expected = {None: logits(None), "a": logits(str(tmp_path / "a")), "b": logits(str(tmp_path / "b")),
                "head": logits(str(tmp_path / "head"))}
    pool = PolicyPool.load(ModelSpec(str(tiny_dir)), {n: str(tmp_path / n) for n in ("a", "b", "head")})
    assert pool.names == ["a", "b", "head"]
    for name in ["a", None, "head", "b", "a", "head", None]:  # any order, back and forth
        with pool.use(name) as model, torch.no_grad():
            assert torch.allclose(model(IDS).logits, expected[name], atol=1e-5), name
    with pytest.raises(ModelError, match="no adapter named 'zzz'"):
        with pool.use("zzz"):
            pass


@pytest.mark.parametrize("bad", [dict(method="qlora"), dict(r=0), dict(dropout=1.5)])
def test_bad_adapter_config_is_one_line(bad):
    with pytest.raises(ModelError):
        AdapterConfig(**bad)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from alignment.models.spec import cpu_has_native_bf16

    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_has_native_bf16(str(amx)) is True
    assert cpu_has_native_bf16(str(plain)) is False
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False
