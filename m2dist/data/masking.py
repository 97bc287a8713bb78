"""BERT masked-language-model corruption with 80/10/10 replacement."""

import torch

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator | None = None,
    special_ids: tuple[int, ...] = (0,),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `probability` of the non-special tokens; of those 80% become [MASK], 10% a random
    token, 10% stay. Returns (corrupted ids, labels with IGNORE_INDEX where not selected)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    device = input_ids.device

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)

    maskable = ~torch.isin(input_ids, torch.tensor(special_ids, device=device))
    selected = (uniform() < probability) & maskable
    labels = torch.where(selected, input_ids, IGNORE_INDEX)
    draw = uniform()
    to_mask = selected & (draw < 0.8)
    to_random = selected & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    corrupted = torch.where(to_mask, mask_token_id, input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels
