"""PPO's reward model on the policy's own base: a reward run's LoRA adapter becomes a second named
adapter ("reward") of the policy's PeftModel and its score head a small Linear, so the policy,
the reference (adapters off), the value head and the reward model share one base model.

    scorer, why_not = attach(policy, policy_tokenizer, "runs/reward-4/reward_model", device="cpu")
    if scorer is None: ...                          # why_not: one line (another base, a full model...)
    scorer.score_batch(prompts, completions)        # RewardScorer's scores, on the shared base
    with hidden_from_save(policy): trainer.save_model(...)   # checkpoints hold the policy adapter only
    scorer.detach()                                 # the adapter leaves the policy (before its final save)

A reward run saves a peft adapter trained on `AutoModelForSequenceClassification(base)`: LoRA
matrices on the backbone and the `score` head in full. The policy is
`AutoModelForCausalLM(base)` + LoRA: the same backbone under the same module names, so the
reward LoRA loads onto it unchanged; the head is applied here to the backbone's last hidden
state at the last non-pad token, as the sequence classifier does. Text is tokenized by the
reward run's tokenizer and chat template (RewardScorer.token_ids): scores equal RewardScorer's.

Sharing needs the very weights the reward adapter was trained on. Anything else keeps the
separate RewardScorer (`attach` says why): another base model or quantization or dtype, a fully
fine-tuned or lm_head reward model, another vocabulary, a reward LoRA that trains base weights
too (biases, other modules), or a policy whose base has a parent policy merged into its
weights (a run from a policy on an unquantized base, lineage.py). DoRA adapters (policy or
reward) are peft LoRA adapters with magnitudes and are shared like LoRA; 4-bit/8-bit bases are
shared when both sides load the same quantization.

The reward adapter never trains: it is frozen when added, every switch to it and back restores
each parameter's requires_grad exactly (peft's set_adapter makes the active adapter trainable),
and the optimizer is built over the parameters that require grad, which it is not among.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from alignment.reward_scoring import MANIFEST, RewardScorer

log = logging.getLogger("prefloop.train")

REWARD_ADAPTER = "reward"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HEAD_NAMES = frozenset({"score", "classifier"})  # peft's sequence-classification heads (modules_to_save)
MERGED_PARENT = "prefloop_merged_parent"  # set on a base whose weights have a parent policy merged in


def _same_model(a: str, b: str) -> bool:
    """Whether two model references (a directory, "default", a hub id) name the same weights."""
    from alignment.models.spec import DEFAULT_MODEL_ALIASES

    def where(name: str) -> str:
        if name in DEFAULT_MODEL_ALIASES:
            from alignment.models.default_model import default_model_dir

            return str(Path(default_model_dir()).resolve())
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name

    return where(a) == where(b)


def _quantization(model) -> dict | None:
    """The bitsandbytes settings a model was loaded with (None: not quantized)."""
    from alignment.models import is_quantized

    if not is_quantized(model):
        return None
    config = getattr(model.config, "quantization_config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    keys = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype")
    return {key: str(settings.get(key)) for key in keys}


def _float_dtype(model) -> torch.dtype:
    """The dtype of the base's unquantized weights (the input embeddings')."""
    return model.get_input_embeddings().weight.dtype


def sharing_problem(policy, path: str | Path, *, device: str) -> str | None:
    """Why the reward model at `path` cannot go on `policy`'s base (None: it can). Reads only the
    small files of the reward directory."""
    from alignment.models.spec import ModelSpec, resolve_dtype, resolve_quantize

    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        adapter = json.loads((path / ADAPTER_CONFIG).read_text()) if (path / ADAPTER_CONFIG).is_file() else None
    except (OSError, ValueError) as error:
        return f"its manifest cannot be read ({type(error).__name__})"
    if manifest.get("head") != "reward":
        return "it is not a reward model"
    if manifest.get("adapter_kind") != "peft" or adapter is None:
        return f"it is a {manifest.get('adapter_kind')} reward model, not a LoRA adapter"
    peft_config = getattr(policy, "peft_config", None) or {}
    if not peft_config or getattr(policy, "peft_type", None) != "LORA":
        return "the policy is not a LoRA/DoRA PeftModel"
    if adapter.get("peft_type") != "LORA":
        return f"its adapter is {adapter.get('peft_type')}, not LoRA/DoRA"
    extras = [
        (adapter.get("bias", "none") != "none" or bool(adapter.get("lora_bias")), "trains biases of the base"),
        (bool(set(adapter.get("modules_to_save") or []) - HEAD_NAMES), "trains base modules in full"),
        (bool(adapter.get("target_parameters")), "adapts fused expert weights"),
        (bool(adapter.get("trainable_token_indices")), "trains token embeddings"),
        (bool(adapter.get("layer_replication")), "replicates layers"),
        (bool(adapter.get("use_qalora")) or bool(adapter.get("alora_invocation_tokens")), "is a LoRA variant"),
    ]
    for bad, what in extras:
        if bad:
            return f"its adapter {what}"
    base = policy.get_base_model()
    saved = manifest.get("model_spec") or {}
    reward_model = saved.get("model", manifest.get("base_model"))
    policy_model = getattr(base, "name_or_path", None) or base.config.name_or_path
    if not reward_model or not _same_model(str(reward_model), str(policy_model)):
        return f"it was trained on {reward_model!r}, the policy's base is {policy_model!r}"
    if getattr(base, MERGED_PARENT, None):
        return f"the policy's base has policy {getattr(base, MERGED_PARENT)!r} merged into its weights"
    # RewardScorer.load's spec: the saved model and quantization, the other settings "auto"
    spec = ModelSpec(str(reward_model), quantize=saved.get("quantize", "auto"), device=device)
    mode = resolve_quantize(spec)
    ours = _quantization(base)
    if mode == "none":
        if ours is not None:
            return "the reward model's base is not quantized, the policy's is"
        if _float_dtype(base) != resolve_dtype(spec):
            return f"the reward model computes in {resolve_dtype(spec)}, the policy's base is {_float_dtype(base)}"
    else:
        from alignment.models.quantization import quantization_config

        theirs = {key: str(value) for key, value in quantization_config(spec).to_dict().items() if key in (ours or {})}
        if ours is None or theirs != ours:
            return f"the reward model's base loads in {mode}, the policy's as {ours or 'unquantized'}"
    return None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / ADAPTER_WEIGHTS).is_file():
        return load_file(str(path / ADAPTER_WEIGHTS))
    return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)


def _split_head(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    """(the LoRA tensors, the head's own tensors by parameter name, the head's name)."""
    lora, head, names = {}, {}, set()
    for key, tensor in tensors.items():
        parts = key.split(".")
        owner = next((p for p in parts if p in HEAD_NAMES), None)
        if owner is not None and "lora_" not in key:
            names.add(owner)
            head[parts[-1]] = tensor
        else:
            lora[key] = tensor
    return lora, head, (names.pop() if len(names) == 1 else None)


def attach(policy, policy_tokenizer, path: str | Path, *, device: str) -> tuple["SharedRewardScorer | None", str | None]:
    """The reward model at `path` as a second adapter on `policy`: (scorer, None), or (None, why
    not) with the policy left as it was."""
    from peft import LoraConfig, set_peft_model_state_dict
    from transformers import AutoTokenizer

    problem = sharing_problem(policy, path, device=device)
    if problem:
        return None, problem
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        return None, "its tokenizer's vocabulary is not the policy's"
    lora, head_tensors, head_name = _split_head(_load_weights(path))
    weight = head_tensors.get("weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] != 1 or set(head_tensors) - {"weight", "bias"}:
        return None, "no single-score head in its adapter"
    base = policy.get_base_model()
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    hidden = getattr(base.config.get_text_config(), "hidden_size", None)
    if not isinstance(backbone, nn.Module) or backbone is base or weight.shape[1] != hidden:
        return None, "its head does not fit the policy's backbone"

    config = LoraConfig.from_pretrained(str(path))
    config.modules_to_save = None  # the head lives beside the policy, not inside it
    config.task_type = policy.peft_config[policy.active_adapter].task_type
    config.lora_dropout = 0.0
    config.inference_mode = True
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}
    policy.add_adapter(REWARD_ADAPTER, config)
    try:
        result = set_peft_model_state_dict(policy, lora, adapter_name=REWARD_ADAPTER)
        ours = {name for name, _ in policy.named_parameters() if f".{REWARD_ADAPTER}." in name}
        missing = [k for k in result.missing_keys if f".{REWARD_ADAPTER}." in k]
        if result.unexpected_keys or missing or not ours:
            raise ValueError(f"{len(result.unexpected_keys)} tensors without a place, {len(missing)} missing")
    except (RuntimeError, ValueError, KeyError) as error:
        policy.delete_adapter(REWARD_ADAPTER)
        _restore(policy, flags)
        return None, f"its adapter does not load onto the policy's base ({str(error).splitlines()[0][:200]})"
    _restore(policy, flags)
    # the head in the dtype the sequence classifier would hold it: the base's unquantized weights'
    dtype = base.get_output_embeddings().weight.dtype if base.get_output_embeddings() is not None else weight.dtype
    head = nn.Linear(weight.shape[1], 1, bias="bias" in head_tensors, device=weight.device, dtype=dtype)
    head.load_state_dict({k: v.to(dtype) for k, v in head_tensors.items()})
    head.to(next(backbone.parameters()).device).requires_grad_(False)
    manifest = json.loads((path / MANIFEST).read_text())
    pad = policy_tokenizer.pad_token_id if policy_tokenizer.pad_token_id is not None else policy_tokenizer.eos_token_id
    scorer = SharedRewardScorer(policy, backbone, head, tokenizer, max_length=manifest.get("max_length"),
                                pad_token_id=pad, head_name=head_name)
    return scorer, None


def _restore(model, flags: dict[str, bool]) -> None:
    """Each parameter's requires_grad as recorded; the reward adapter's (new) frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, False))


def hidden_from_save(model, name: str = REWARD_ADAPTER):
    """While saving, the reward adapter is not among the model's adapters (peft saves them all)."""
    configs = getattr(model, "peft_config", None)
    if not configs or name not in configs:
        return contextlib.nullcontext()
    return _without_config(configs, name)


@contextlib.contextmanager
def _without_config(configs: dict, name: str):
    config = configs.pop(name)
    try:
        yield
    finally:
        configs[name] = config


def last_non_pad(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Each row's last position that is not padding, as transformers' sequence classifiers pool."""
    if pad_token_id is None:
        return torch.full((input_ids.size(0),), input_ids.size(1) - 1, device=input_ids.device)
    keep = (input_ids != pad_token_id).int()
    positions = torch.arange(input_ids.size(1), device=input_ids.device, dtype=torch.int32)
    return (positions * keep).argmax(-1)


class SharedRewardScorer(RewardScorer):
    """A RewardScorer whose model is the policy's backbone with the reward adapter switched on."""

    def __init__(self, policy, backbone: nn.Module, head: nn.Linear, tokenizer, *, max_length: int | None,
                 pad_token_id: int | None, head_name: str | None = None) -> None:
        # not RewardScorer.__init__: the shared model must not be put in eval mode for good
        self.policy, self.backbone, self.head = policy, backbone, head
        self.tokenizer, self.max_length, self.pad_token_id = tokenizer, max_length, pad_token_id
        self.head_name = head_name
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.sep_token

    @property
    def model(self):  # what RewardScorer users read (its device, its parameters)
        return self.policy

    @property
    def attached(self) -> bool:
        return REWARD_ADAPTER in getattr(self.policy, "peft_config", {})

    @contextlib.contextmanager
    def reward_adapter(self):
        """The policy's base with the reward adapter as the only active one, in eval mode; then the
        policy adapter, the training mode and every parameter's requires_grad as they were."""
        if not self.attached:
            raise RuntimeError("the reward adapter was detached from the policy: nothing left to score with")
        policy = self.policy
        flags = {name: p.requires_grad for name, p in policy.named_parameters()}
        previous, was_training = policy.active_adapter, policy.training
        policy.eval()
        policy.set_adapter(REWARD_ADAPTER)
        try:
            yield
        finally:
            policy.set_adapter(previous)
            _restore(policy, flags)
            policy.train(was_training)

    @torch.no_grad()
    def score_batch(self, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 16) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        device = self.head.weight.device
        scores: list[float] = []
        with self.reward_adapter():
            for start in range(0, len(prompts), batch_size):
                ids = [self.token_ids(p, r) for p, r in zip(prompts[start : start + batch_size],
                                                             responses[start : start + batch_size])]
                batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="right").to(device)
                hidden = self.backbone(**batch, use_cache=False).last_hidden_state
                rows = torch.arange(hidden.size(0), device=device)
                pooled = hidden[rows, last_non_pad(batch["input_ids"], self.pad_token_id)]
                scores += self.head(pooled.to(self.head.weight.dtype))[:, 0].float().tolist()
        return scores

    def detach(self) -> None:
        """Take the reward adapter off the policy (its memory freed; the scorer cannot score after)."""
        if self.attached:
            flags = {name: p.requires_grad for name, p in self.policy.named_parameters()}
            self.policy.delete_adapter(REWARD_ADAPTER)
            _restore(self.policy, flags)
