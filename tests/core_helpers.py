"""Helpers shared by the core tests (test_core_*, test_peft_*, test_fold, test_config).

PEFT is the independent reference: it builds and stores adapters its own way, and these
helpers only make the two sides see the same inputs and the same (random) vectors.
"""
from __future__ import annotations

import torch

SEQ2SEQ = ("t5", "bart")


def sample_inputs(model_type: str, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_type in SEQ2SEQ:
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def outputs(model, model_type: str) -> torch.Tensor:
    """Logits and last hidden states, flattened, in float64.

    The hidden states matter: a tiny classifier's logits are ~0.02 and would hide differences.
    """
    with torch.no_grad():
        out = model(**sample_inputs(model_type), output_hidden_states=True)
    hidden = getattr(out, "decoder_hidden_states", None) or out.hidden_states
    pieces = [out.logits] if getattr(out, "logits", None) is not None else []
    return torch.cat([p.reshape(-1).double() for p in [*pieces, hidden[-1]]])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def peft_ia3_config(model_type: str | None = None, **kwargs):
    """PEFT's IA3Config; with model_type and no targets, OUR default targets (not PEFT's)."""
    from peft import IA3Config as PeftIA3Config

    from ia3_export.core.config import DEFAULT_TARGETS

    if model_type is not None and "target_modules" not in kwargs:
        targets, feedforward = DEFAULT_TARGETS[model_type]
        kwargs |= {"target_modules": targets, "feedforward_modules": feedforward}
    return PeftIA3Config(**kwargs)


def randomize_peft(peft_model, seed: int = 3, spread: float = 0.5) -> None:
    """Random non-identity vectors (and perturbed task heads) in a PEFT model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1 + spread * (2 * torch.rand(p.shape, generator=generator) - 1))
            elif ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def ia3_module_names(model) -> set[str]:
    """Paths of PEFT's IA3 layers, without PEFT's `base_model.model.` prefix."""
    from peft.tuners.ia3 import IA3Layer as PeftIA3Layer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, PeftIA3Layer)}


def peft_feedforward(model) -> dict[str, bool]:
    from peft.tuners.ia3 import IA3Layer as PeftIA3Layer

    return {n.removeprefix("base_model.model."): m.is_feedforward
            for n, m in model.named_modules() if isinstance(m, PeftIA3Layer)}
