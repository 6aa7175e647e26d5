"""Every transformers / peft call of keepmix: load, adapt, split into trunk and head, save.

Contract: `load_model` returns (model, tokenizer) from a hub id, a local folder, a GGUF file, or — for
proxy experiments — a fresh model built from an architecture config with a given tokenizer. Weights
are float32 on CPU. `trunk_and_head` gives the module that maps ids to final hidden states and the
output projection, so keepmix computes the LM loss chunk by chunk without full logits.
`save_final` writes a folder that `AutoModelForCausalLM.from_pretrained` loads (adapter merged on
request), with the tokenizer.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from keepmix.errors import KeepmixError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """keepmix draws its own progress; silence transformers' per-file bars and advisory warnings."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    # the GGUF converter draws a raw tqdm bar that the switch above does not reach
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_utils.tqdm = functools.partial(bar, disable=True)


def weight_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of model.dtype: "auto" keeps float32 master weights everywhere (on GPUs bf16 comes
    from autocast)."""
    return torch.float32 if dtype == "auto" else DTYPES[dtype]


def plain_name(name: str) -> str:
    """A parameter's name in the plain model: PEFT moves each weight it wraps with LoRA under `base_layer`."""
    return name.replace(".base_layer.", ".")


def load_tokenizer(name: str, *, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise KeepmixError(f"could not load the tokenizer {name!r}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding never reaches the loss (labels are -100 there)
    return tok


def load_model(
    name: str | None,
    *,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    init: str = "pretrained",
    architecture: dict | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    seed: int = 0,
):
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()

    torch_dtype = weight_dtype(dtype)
    tok_gguf = gguf_file if tokenizer is None else None
    tok = load_tokenizer(tokenizer or name, gguf_file=tok_gguf, trust_remote_code=trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if init == "scratch":
        arch = dict(architecture)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tok))
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            arch.setdefault(key, getattr(tok, key))
        config = AutoConfig.for_model(model_type, **arch)
        torch.manual_seed(seed)  # initial weights follow the run's seed
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as err:
            hint = "" if Path(name).exists() else (" (there is no local folder of that name either: check the "
                                                    "path, or the hub id and the network)")
            raise KeepmixError(f"could not load the model {name!r}: {err}{hint}") from None
    if gguf_file:
        # GGUF weights are dequantized to plain floats, but transformers still marks the model as
        # quantized and refuses save_pretrained; the weights are ordinary tensors, so drop the mark.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise KeepmixError(f"the tokenizer has {len(tok)} tokens but the model's embedding only "
                           f"{model.get_input_embeddings().num_embeddings}")
    return model, tok


def load_configured(cfg, *, lora: bool = True):
    """The model and tokenizer a run of `cfg` (a RunConfig) starts from, built as the run builds it:
    model.name (or model.architecture from scratch, seeded by train.seed), model.dtype and
    model.attn_implementation, and with `lora` a fresh adapter where model.lora is set — so an eval of
    the base computes what the run's step-0 eval computed."""
    m = cfg.model
    model, tokenizer = load_model(
        cfg.resolve(m.name), gguf_file=m.gguf_file, tokenizer=cfg.resolve(m.tokenizer), init=m.init,
        architecture=m.architecture, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation, seed=cfg.train.seed,
    )
    if lora and m.lora:
        model = add_lora(model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                         target_modules=m.lora.target_modules)
    return model, tokenizer


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def base_model(model) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_adapted(model) -> bool:
    """Whether the model carries a PEFT adapter (LoRA)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def adapter_disabled(model):
    """A context in which a PEFT model computes as its base model (the adapter switched off)."""
    return model.disable_adapter()


def trunk_and_head(model) -> tuple[nn.Module, nn.Module]:
    """(module mapping ids → final hidden states, output projection)."""
    base = base_model(model)
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        raise KeepmixError(
            f"{cfg.model_type} transforms its logits after the head; set train.loss_impl: full for this model"
        )
    return base.get_decoder(), base.get_output_embeddings()


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all of them, or the adapter), by name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise KeepmixError(f"checkpoint weights do not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_final(model, tokenizer, out: Path, *, merge_lora: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if hasattr(model, "merge_and_unload") and merge_lora:
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def interpolate(base: nn.Module, final: nn.Module, alpha: float) -> nn.Module:
    """A copy of `base` with every parameter at θ0 + α(θ − θ0) (torch.lerp: exactly θ0 at α = 0 and θ at
    α = 1); the two models must have the same architecture."""
    import copy

    out = copy.deepcopy(base)
    theta = dict(final.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name not in theta or theta[name].shape != p.shape:
                raise KeepmixError(f"merge: the final model has no parameter {name} of shape {tuple(p.shape)}; "
                                   f"it is not a fine-tune of this base model")
            p.copy_(torch.lerp(p, theta[name].to(p.dtype), float(alpha)))
    return out


def with_scaled_adapter(base: nn.Module, adapter_dir: Path, alpha: float) -> nn.Module:
    """A copy of `base` carrying the LoRA adapter saved in `adapter_dir`, its update scaled by α (lora_B × α,
    so ΔW = α·B·A·scale)."""
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(float(alpha))
    return model
