"""What a model's own `*ForCausalLM.forward` does between its decoder and the logits: a first guess read from
its source, confirmed by running the model.

The fast path never asks the model for logits: it takes the decoder's final hidden state and applies the
output head itself, only where a completion token is predicted. So it must repeat exactly what the model's
forward applies around the head. transformers' forwards do one of a few things there (5.x, read across every
`*ForCausalLM`):

    logits = self.lm_head(hidden_states)                                    # most families
    if cap is not None: logits = logits / cap; logits = torch.tanh(logits); logits = logits * cap   # Gemma 2/3/3n/4
    logits = logits * self.logit_scale                                      # Cohere, Cohere 2
    logits = logits / self.config.logits_scaling                            # Granite (and its MoE variants)
    logits = self.lm_head(hidden_states) * self.model.lm_head_multiplier   # Falcon-H1
    hidden_states = hidden_states / self.config.logits_scaling              # MiniCPM3 (before the head)

`head_spec` reads the forward's source and recognises these statements by their shape, not by attribute
names: soft-capping is the divide / tanh / multiply sequence by one value, and a plain multiplication is a
logit multiplier whether or not an `if X is not None:` guards it (a guarded value that is None is not
applied). The numbers come from the live model, so a config without soft-capping gets none. Any other
statement about the hidden states or the logits is refused in one line naming it.

Reading source is only the first guess: a forward whose source cannot be read (or that hides a step in a
helper) gets a plain head here. The verdict is the start-up head check (`selfcheck.check_head`), which
compares this spec, applied to the hidden state of one real forward, with that same forward's own logits.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import dataclass

import torch

from ..errors import PrefalignError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `PreTrainedModel` inside DDP / DataParallel / torch.compile / peft wrappers (FSDP2 shards in place)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DataParallel, FSDP1
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
    return model


def model_class(model: torch.nn.Module) -> type:
    """The transformers class of a model (FSDP2 swaps in a subclass named FSDP<Name>)."""
    for cls in type(model).__mro__:
        if not cls.__name__.startswith("FSDP"):
            return cls
    return type(model)


@dataclass(frozen=True)
class HeadSpec:
    """hidden / hidden_divisor → output head → × logit_multiplier → soft-cap at `softcap` → first `vocab_limit`."""

    hidden_divisor: float | None = None
    logit_multiplier: float | None = None
    softcap: float | None = None
    vocab_limit: int | None = None

    def apply_to_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.hidden_divisor is None else hidden / self.hidden_divisor

    def apply_to_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` are fp32 here: soft-capping in fp32 is at least as exact as the model's own dtype."""
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.vocab_limit is not None:
            logits = logits[..., : self.vocab_limit]
        return logits

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in vars(self).items() if v is not None]
        return ", ".join(parts) or "plain output head"


_ATTR = r"(self(?:\.\w+)+)"  # an attribute path on the model: self.config.x, self.logit_scale, self.model.y
# Statements that change nothing we compute (we slice, cast and use fp32 ourselves).
_NEUTRAL = [
    r"hidden_states = (outputs|transformer_outputs|model_outputs?|\w+_outputs)(\.last_hidden_state|\[0\])",
    r"hidden_states = model_output\.last_hidden_state if return_dict else model_output\[0\]",
    r"hidden_states = slice_logits_to_keep\((hidden_states|outputs\.last_hidden_state), logits_to_keep\)",
    r"if hidden_states\.shape\[1\] == \(input_ids if input_ids is not None else inputs_embeds\)\.shape\[1\]:",
    r"(lm_)?logits = self\.lm_head\(hidden_states(\.to\((dtype=)?self\.lm_head\.weight\.dtype\))?\)(\.float\(\)|\.contiguous\(\))?",
    r"logits = logits\.(float\(\)|to\(torch\.float32\))",
    r"unpadded_vocab_size = self\.config\.unpadded_vocab_size",
    r"if unpadded_vocab_size is not None and unpadded_vocab_size < logits\.shape\[-1\]:",
    r"logits = logits\[\.\.\., :unpadded_vocab_size\]",
    r"cap = self\.config\.logits_soft_cap",
]
_GUARD = rf"if {_ATTR} is not None:"
# Soft-capping is these three statements in a row, all by the same value (a lone tanh is not neutral).
_SOFTCAP = (rf"logits = logits(?:\.float\(\))? / {_ATTR}", r"logits = (?:torch|nn\.functional)\.tanh\(logits\)",
            rf"logits = logits \* {_ATTR}")
# Single statements that transform: (pattern, kind); group 1 is the attribute path of the value.
_TRANSFORMS = [
    (rf"logits = logits(?:\.float\(\))? / {_ATTR}", "divide"),
    (rf"logits = logits \* {_ATTR}", "multiply"),
    (rf"logits = self\.lm_head\(hidden_states\) \* {_ATTR}", "multiply"),
    (rf"hidden_states = (?:outputs\.last_hidden_state|hidden_states) / {_ATTR}", "hidden_divide"),
    (r"logits = nn\.functional\.tanh\(logits / cap\) \* (cap)", "softcap"),  # RecurrentGemma, after `cap = ...`
]
_CAP_LOCAL = "self.config.logits_soft_cap"  # what `cap` holds in the last pattern


def _resolve(model: torch.nn.Module, path: str):
    value = model
    for name in path.split(".")[1:]:
        value = getattr(value, name, None)
        if value is None:
            return None
    return float(value) if isinstance(value, int | float | torch.Tensor) else value


def _head_statements(cls: type) -> list[str] | None:
    """The forward's statements from its decoder output to the loss, comments and blank lines dropped."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return None
    lines = [ln.split("#")[0].strip() for ln in source.splitlines()]
    # transformers <= 5.20 slices inside the head call (`lm_head(hidden_states[:, slice_indices, :])`), 5.21 on in
    # `slice_logits_to_keep` before it: which positions get logits is ours to choose, so the slice is neutral.
    lines = [ln.replace("hidden_states[:, slice_indices, :]", "hidden_states") for ln in lines if ln]
    head = [i for i, ln in enumerate(lines) if "lm_head(" in ln]
    if not head:
        return None
    start = head[0]
    while start > 0 and "hidden_states" in lines[start - 1] and "=" in lines[start - 1] and not lines[start - 1].startswith(")"):
        start -= 1
    out = []
    for ln in lines[start:]:
        if ln.startswith(("loss", "if labels", "return", "if not return_dict", "output")):
            break
        out.append(ln)
    return out


def _transform_at(statements: list[str], i: int) -> tuple[str, str, int] | None:
    """(kind, attribute path of its value, statements used) of the transform starting at statement i."""
    window = statements[i : i + 3]
    cap = [re.fullmatch(p, s) for p, s in zip(_SOFTCAP, window, strict=False)]
    if len(window) == 3 and all(cap) and cap[0].group(1) == cap[2].group(1):
        return "softcap", cap[0].group(1), 3
    for pattern, kind in _TRANSFORMS:
        match = re.fullmatch(pattern, statements[i])
        if match:
            return kind, (_CAP_LOCAL if match.group(1) == "cap" else match.group(1)), 1
    return None


def head_spec(model: torch.nn.Module) -> HeadSpec:
    """The `HeadSpec` of `model` (wrappers looked through); PrefalignError for a forward it cannot follow."""
    inner = unwrap(model)
    cls = model_class(inner)
    statements = _head_statements(cls)
    if statements is None:
        return HeadSpec()  # source unavailable: the start-up head check compares against the model's logits

    def refuse(stmt: str, why: str = "does not know this step between the model's decoder and its logits"):
        return PrefalignError(f"{cls.__name__}: prefalign's log-prob path {why}: `{stmt}` (the model is refused "
                              "rather than scored wrongly)")

    fields: dict[str, float | None] = {}
    guard = None  # the attribute an `if X is not None:` just tested: the next transform must be by X
    i = 0
    while i < len(statements):
        stmt = statements[i]
        if any(re.fullmatch(p, stmt) for p in _NEUTRAL):
            i += 1
            continue
        tested = re.fullmatch(_GUARD, stmt)
        if tested and guard is None:
            guard = tested.group(1)
            i += 1
            continue
        found = _transform_at(statements, i)
        if found is None:
            raise refuse(stmt)
        kind, path, used = found
        if guard is not None and path != guard:
            raise refuse(f"if {guard} is not None: {stmt}", "cannot follow a guard on one value around a step by another")
        guard = None
        value = _resolve(inner, path)  # None (a guarded value that is unset): the step is not applied
        if value is not None and not isinstance(value, float):
            raise PrefalignError(f"{cls.__name__}: cannot read {path} ({value!r}) for the log-prob path")
        if value is None:
            pass
        elif kind == "softcap":
            fields["softcap"] = value
        elif kind == "hidden_divide":
            fields["hidden_divisor"] = value
        else:  # several scales compose
            factor = value if kind == "multiply" else 1.0 / value
            fields["logit_multiplier"] = factor * (fields.get("logit_multiplier") or 1.0)
        i += used
    if guard is not None:
        raise refuse(f"if {guard} is not None:", "cannot follow a guard with no step after it")
    if any("unpadded_vocab_size" in s for s in statements):
        limit = getattr(inner.config, "unpadded_vocab_size", None)
        if limit is not None and not isinstance(limit, int):
            raise PrefalignError(f"{cls.__name__}: cannot read vocab_limit ({limit!r}) for the log-prob path")
        fields["vocab_limit"] = limit
    return HeadSpec(**{k: (int(v) if k == "vocab_limit" else float(v)) for k, v in fields.items() if v is not None})
