"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashllm.protocol.client_api import TEMPERATURE_ALLOWED, is_valid_temperature

MAX_STOP_STRINGS = 16


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the allowed range."""
        checks = [
            (isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= 1_000_000, "max_tokens", "an integer in 1..1000000"),
            (isinstance(self.temperature, (int, float)) and is_valid_temperature(self.temperature), "temperature",
             TEMPERATURE_ALLOWED),
            (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer ≥ 0"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed", "an integer in 0..2^63-1"),
            (isinstance(self.stop, list) and len(self.stop) <= MAX_STOP_STRINGS
             and all(isinstance(s, str) and s for s in self.stop), "stop", f"a list of at most {MAX_STOP_STRINGS} non-empty strings"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits (V,) float32 → one token id.

    Safe for every accepted temperature and top_p, however small: the logits are shifted so the best is 0
    before dividing (a tiny temperature then gives -inf to the others, never inf - inf), and the most likely
    token always survives the top-p cut (a top_p below float32's smallest number used to drop them all).
    Logits with NaN (a corrupt store, a numerical fault) raise NonFiniteLogitsError instead of sampling noise.
    """
    if torch.isnan(logits).any():
        raise NonFiniteLogitsError(f"the model produced NaN logits ({int(torch.isnan(logits).sum())} of "
                                   f"{logits.shape[-1]}); the store may be corrupt: run `flashllm verify --store STORE`")
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits.double().cpu()  # (V,)
    logits = (logits - logits.max()) / params.temperature  # (V,) best token at 0, the rest ≤ 0 (or -inf)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (V,)
        probs = torch.softmax(sorted_logits, dim=-1)  # (V,)
        # drop tokens once the mass before them already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p  # (V,)
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class NonFiniteLogitsError(ArithmeticError):
    """The model's logits hold NaN: nothing sensible can be sampled from them."""
