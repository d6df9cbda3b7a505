"""Models: Hugging Face checkpoints (hub id, local folder or GGUF file) or from scratch, checked against the
tokenizer their data were made with (data.tokenizer); the returned model saved.

Everything goes through transformers' Auto classes; `trust_remote_code` stays off. A from-scratch model
takes its architecture from `ARCHS` and its vocabulary size from the tokenizer its data were made with.
"""

import os
import shutil
import warnings

import torch

from pace_lm import PaceLMError, hub_load_errors, one_line
from pace_lm.config.registry import ARCHS, DTYPES
from pace_lm.data.tokenizer import load_tokenizer
from pace_lm.files.atomic import os_error, replace_folder, write_failed


def _strict_errors():
    """huggingface_hub's config validation error (its configs are strict dataclasses), if it has one."""
    import huggingface_hub.errors as hub_errors

    return getattr(hub_errors, "StrictDataclassError", ValueError)


def build_model(spec, tokenizer):
    """The model of `spec` (a validated schema.Model), its embeddings sized for `tokenizer`.

    Weights are float32 unless spec.dtype says otherwise: the optimizer keeps fp32 master weights and
    bf16 comes from autocast on CUDA.
    """
    import transformers

    dtype = DTYPES[spec.dtype]
    if spec.source == "scratch":
        vocab = _round_up(len(tokenizer), spec.pad_vocab_to_multiple_of)
        config_cls = getattr(transformers, ARCHS[spec.arch])
        try:  # transformers checks some sizes in the config, others only when it builds the layers
            config = config_cls(vocab_size=vocab, **_special_ids(spec.arch, tokenizer), **dict(spec.config))
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, TypeError, RuntimeError, ZeroDivisionError, _strict_errors()) as e:
            raise PaceLMError(
                f"model.config={dict(spec.config)} is not a valid {spec.arch} config ({one_line(e.__cause__ or e)})"
            ) from e
    else:  # pretrained
        path = spec.pretrained
        check_tokenizer(spec, tokenizer)
        kwargs = {}
        if spec.gguf_file and hasattr(transformers, "GgufConfig"):
            # dense, trainable, savable weights, even where a kernel could keep the GGUF blocks packed
            kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path,
                revision=spec.revision,
                gguf_file=spec.gguf_file,
                dtype=dtype,
                attn_implementation=spec.attn_implementation,
                trust_remote_code=False,
                **kwargs,
            )
        except hub_load_errors() as e:
            raise PaceLMError(f"could not load model {path!r}: {one_line(e)}") from e
        if spec.gguf_file and getattr(model, "hf_quantizer", None) is not None:  # older transformers
            model.hf_quantizer.remove_quantization_config(model)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # e.g. ChatML tokens added
            model.resize_token_embeddings(len(tokenizer))
    if spec.gradient_checkpointing:  # each layer's activations recomputed in the backward pass, not kept
        # non-reentrant: the grads are the same, and each parameter's grad hook fires (pace.backward)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_tokenizer(cfg, tokenizer):
    """The data must be in the pretrained model's own token ids (ChatML tokens may have been added).

    Token ids of another tokenizer train without any error and mean nothing to the model, e.g. one
    smoltalk folder prepared for SmolLM2 and reused for Qwen3: this turns that into a clear error.
    """
    try:
        own = load_tokenizer(cfg.pretrained, gguf_file=cfg.gguf_file, revision=cfg.revision).get_vocab()
    except PaceLMError as e:  # e.g. a folder of weights saved without a tokenizer: nothing to check against
        warnings.warn(f"model {cfg.name!r}: the data's token ids are not checked ({e})", stacklevel=2)
        return
    data = tokenizer.get_vocab()
    differ = sum(data.get(token) != i for token, i in own.items())
    if differ:
        raise PaceLMError(
            f"the data were tokenized with another tokenizer than the one of model {cfg.name!r} "
            f"({differ} of its {len(own)} tokens have other ids): prepare dataset.path with "
            f"`pace-data --tokenizer {cfg.pretrained}"
            f"{f' --gguf-file {cfg.gguf_file}' if cfg.gguf_file else ''} ...`"
        )


def _special_ids(arch, tokenizer):
    eos = tokenizer.eos_token_id
    if arch == "gpt2":
        return dict(bos_token_id=eos, eos_token_id=eos)
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def save_model(model, tokenizer, out, world):
    """save_pretrained (safetensors) of the model as it is, with the tokenizer, moved into place whole.

    Every rank calls it; rank 0 writes. Under FSDP2 the full weights are gathered to rank 0's CPU first
    and saved from a plain model of the same class.
    """
    tmp = os.path.join(os.path.dirname(out), ".model.tmp")
    to_save, state_dict = model, None
    if world.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.main:
            from torch.distributed.fsdp import FSDPModule

            # fully_shard made the model's class FSDP<Class>(FSDPModule, Class): a plain Class to save from
            cls = next(c for c in type(model).__mro__ if c is not FSDPModule and not issubclass(c, FSDPModule))
            with torch.device("meta"):
                to_save = cls._from_config(model.config)
            to_save.load_state_dict(state_dict, assign=True)
            to_save.tie_weights()
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            to_save.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # a full disk, a read-only folder: no partial model is left looking whole
            cause = os_error(e)
            if cause is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            needed = sum(p.numel() * p.element_size() for p in to_save.state_dict().values())
            raise write_failed("the returned model", out, cause, needed) from e
        replace_folder(tmp, out, os.path.join(os.path.dirname(out), ".model.old"))
    if world.parallel:
        torch.distributed.barrier()
    return out
