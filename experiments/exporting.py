"""Saving a finished run's adapters: orbax (``--save-adapters``) and Hugging Face PEFT (``--export-peft``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

import lorapro_jax as lp

from .methods import MethodState, _require
from .modeling import HEADS, model_dir

__all__ = ["export_run"]


def _lora_ga_peft_model(model: nnx.Module, record: dict) -> nnx.Module:
    """A copy of a LoRA-GA model expressed against the ORIGINAL base weights, for PEFT export.

    LoRA-GA replaced ``W0`` by ``W0' = W0 - s B0 A0``; each layer of the copy gets its original
    kernel back and the rank-``2r`` adapter ``s [B | B0] [A ; -A0]`` (``lora_ga_export``), so
    ``W0 + ΔW`` equals the trained ``W0' + s B A``.
    """
    from lorapro_jax.init import lora_ga_export, lora_ga_original_kernels

    out = nnx.clone(model)
    pairs = lora_ga_export(out, record)
    kernels = lora_ga_original_kernels(out, record)
    for path, layer in lp.lora_layers(out).items():
        if path not in pairs:
            continue
        pair = pairs[path]
        k = layer.base.kernel[...]
        layer.base.kernel[...] = kernels[path].astype(k.dtype)
        layer.lora = lp.LoRAParam(pair)
        layer.gate = lp.LoRAGate(jnp.ones((pair.rank,), layer.gate[...].dtype))
        layer.a_mask = None
    return out


def export_run(
    args: argparse.Namespace, model: nnx.Module, method: str, name: str, mstate: MethodState, arch: str
) -> dict[str, str]:
    """Write the requested exports of run ``name``; returns ``{kind: path}`` (and notes)."""
    out: dict[str, str] = {}
    if method == "full":
        if args.save_adapters or args.export_peft:
            print(f"[{name}] full fine-tuning has no adapters: --save-adapters / --export-peft skipped", file=sys.stderr)
        return out
    if args.save_adapters:
        ck = _require("lorapro_jax.checkpoint", ["save_adapters"], "--save-adapters")
        extra = {"method": method, "run": name, "base_model": str(model_dir(args))}
        if method == "lora-ga":
            extra["note"] = "LoRA-GA adapters apply to the LoRA-GA-modified base weights; use --export-peft for a standalone adapter"
        out["adapters"] = ck.save_adapters(Path(args.save_adapters) / name, model, extra=extra)
    if args.export_peft:
        ex = _require("lorapro_jax.export", ["save_peft_adapter"], "--export-peft")
        target = _lora_ga_peft_model(model, mstate.lora_ga_record) if mstate.lora_ga_record is not None else model
        rslora = args.rslora if args.rslora is not None else (method == "lora-ga")
        head = HEADS[arch]
        # The head trained in full travels as PEFT's modules_to_save (what a SEQ_CLS adapter carries).
        saved = [head] if head is not None and not args.no_train_head else None
        out["peft"] = str(ex.save_peft_adapter(
            target, Path(args.export_peft) / name, base_model_name_or_path=str(model_dir(args)),
            task_type={"t5-seq2seq": "SEQ_2_SEQ_LM", "llama-lm": "CAUSAL_LM"}.get(arch, "SEQ_CLS"), use_rslora=rslora,
            modules_to_save=saved,
        ))
        if head is not None and saved is None:
            out["peft_note"] = f"--no-train-head: the '{head}' head is not part of the PEFT adapter"
    return out

