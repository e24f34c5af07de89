"""SDPA fastpath patchers for BERT-structured encoders and OPT decoders (first-party plugin).

``patchkit.apply(model, attention="sdpa")``: padding-free BERT-family encoders (BERT/RoBERTa/XLM-R and
their copies, RoBERTa-PreLayerNorm, XLM-RoBERTa-XL, DistilBERT; packed
tokens, per-sequence SDPA, exact on valid tokens) and OPT decoders (padding-free forward and
prefill, the KV cache filled in transformers' layout; decode steps through transformers' SDPA).
Importing this package is cheap: transformers is imported only when a patcher's check or build runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from patchkit import Patcher, hookimpl

PATCHKIT_API = ">=1,<2"
REQUIRES = {"transformers": ">=5.0"}


OPTIONS = {
    "trust_transformers": "patch a transformers release whose source fingerprint is not recorded",
    "path": "per-call path: 'auto' (cost model, default), 'packed' or 'original' (forced; also PATCHKIT_PATH)",
}


@hookimpl
def register_patchers(register: Callable[[Any], None]) -> None:
    """Register the BERT and DistilBERT encoder and OPT decoder patchers (family ``"sdpa"``, kind ``"attention"``)."""
    from . import bert, distilbert, encoder_generic, encoder_split, mpnet, opt

    register(
        Patcher(
            name="sdpa-bert-encoder",
            kind="attention",
            family="sdpa",
            match=bert.looks_like_bert_encoder,
            check=bert.check,
            build=bert.build,
            description="BERT-structured encoder, padding-free (packed tokens, per-sequence SDPA)",
            covers=(
                "BertModel",
                "RobertaModel",
                "XLMRobertaModel",
                "RobertaPreLayerNormModel",
                "XLMRobertaXLModel",
                "BERT-structured encoders",
            ),
            options=OPTIONS,
        )
    )
    register(
        Patcher(
            name="sdpa-distilbert-encoder",
            kind="attention",
            family="sdpa",
            match=distilbert.looks_like_distilbert_transformer,
            check=distilbert.check,
            build=distilbert.build,
            description="DistilBERT transformer, padding-free (packed tokens, per-sequence SDPA)",
            covers=("DistilBertModel",),
            options=OPTIONS,
        )
    )
    register(
        Patcher(
            name="sdpa-mpnet-encoder",
            kind="attention",
            family="sdpa",
            match=mpnet.looks_like_mpnet_encoder,
            check=mpnet.check,
            build=mpnet.build,
            description="MPNet encoder, padding-free: packed tokens, per-sequence SDPA plus the relative bias",
            covers=("MPNetModel", "all-mpnet-base-v2"),
            options=OPTIONS,
        )
    )
    register(
        Patcher(
            name="sdpa-split-encoder",
            kind="attention",
            family="sdpa",
            match=encoder_split.match,
            check=encoder_split.check,
            build=encoder_split.build,
            description="DeBERTa / DeBERTa-v2 / RoFormer: their own encoder forward per group of same-length sequences",
            covers=("DebertaV2Model", "DebertaModel", "RoFormerModel"),
            options=OPTIONS,
        )
    )
    register(
        Patcher(
            name="sdpa-generic-encoder",
            kind="attention",
            family="sdpa",
            match=encoder_generic.match,
            check=encoder_generic.check,
            build=encoder_generic.build,
            priority=-10,
            description="any bidirectional encoder dispatching through transformers' attention interface, padding-free",
            covers=(
                "ModernBertModel",
                "GteModel",
                "NomicBertModel",
                "EuroBertModel",
                "AlbertModel",
                "encoders using ALL_ATTENTION_FUNCTIONS (see docs/support.md)",
            ),
            options=OPTIONS,
        )
    )
    register(
        Patcher(
            name="sdpa-opt-decoder",
            kind="attention",
            family="sdpa",
            match=opt.looks_like_opt_decoder,
            check=opt.check,
            build=opt.build,
            description="OPT decoder: padding-free forward and prefill (fills the KV cache), SDPA decode steps",
            covers=("OPTModel", "OPTForCausalLM"),
            options=OPTIONS,
        )
    )


@hookimpl
def register_demos(register: Callable[[Any], None]) -> None:
    """``patchkit demo``: the MiniLM-shaped encoder (see :mod:`patchkit_sdpa.demo`)."""
    from .demo import DEMO

    register(DEMO)
