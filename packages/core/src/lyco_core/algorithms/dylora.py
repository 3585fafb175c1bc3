"""DyLoRA: a LoRA trained so that every prefix of its rank blocks works on its own.

Files use the LoRA names and layout, with ``lora_up`` 2-D even for convs (as LyCORIS writes it):
``lora_down.weight (r, I, *k)``, ``lora_up.weight (O, r)``, ``alpha ()``. Reading is plain LoRA
(``ΔW = (α_file/r)·up·down``), inherited from :class:`~.lora.LoRA`; DyLoRA files are never detected as
such (no detector keys), exactly as in LyCORIS and every consumer.

Training. The rank r is split into ``r/bs`` blocks of ``block_size`` (bs, which must divide r). Each
step draws a block index b uniformly from ``[0, r/bs)``: blocks ``< b`` are used detached, block b
trains, and LyCORIS scales by ``α/(b+1)``, i.e. α over the number of *blocks* in use.

Alpha in the file. At full rank (b+1 = r/bs) training used ``α·bs/r``; a consumer computes
``α_file/r``. LyCORIS stores the raw α, so every reader applies ``1/bs`` of the trained effect. Lyco
stores ``α_file = α·bs``: then ``α_file/k = α/(k/bs)`` equals the training scale at *every* rank
``k`` that is a multiple of bs, so truncating a file (:func:`dylora_truncate`) keeps alpha unchanged.
Checked against LyCORIS 4.1.3 ``DyLoraModule.get_diff_weight(rank=(r/bs − 1)·bs)`` (its ``rank`` is the
count of *detached* ranks, so that call uses all blocks with scale ``α/(r/bs)``; its training forward
draws the same full-rank case with probability bs/r).
"""

from __future__ import annotations

import torch

from ..errors import InvalidConfigError
from ..layers import LayerInfo
from . import init
from .base import AdapterOptions, Tensors, alpha_tensor
from .lora import DOWN, UP, LoRA


def dylora_truncate(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rank`` ranks: ``down (r, I, *k) → (rank, I, *k)``, ``up (O, r, …) → (O, rank, …)``.

    Keep the stored alpha as it is: with Lyco's ``α_file = α·bs`` the consumer's ``α_file/rank`` is the
    scale training used at that rank (for ``rank`` a multiple of the block size).
    """
    r = down.shape[0]
    if not 1 <= rank <= r:
        raise InvalidConfigError(f"rank: must be between 1 and {r}, got {rank}")
    if up.shape[1] != r:
        raise InvalidConfigError(f"rank: lora_up has {up.shape[1]} ranks, lora_down has {r}")
    return down[:rank].clone(), up[:, :rank].clone()


def sample_rank_blocks(r: int, block_size: int, generator: torch.Generator | None = None) -> int:
    """Draw the rank k in use for one training step: ``k = (b+1)·bs`` with b uniform in ``[0, r/bs)``.

    The step uses ranks ``[0, k)``: ranks ``[0, k−bs)`` detached, the block ``[k−bs, k)`` trained, and
    the scale ``α_file/k`` (= LyCORIS's ``α/(b+1)``), i.e. ``lora_delta`` on the truncated factors.
    """
    check_block_size(r, block_size)
    b = int(torch.randint(0, r // block_size, (1,), generator=generator).item())
    return (b + 1) * block_size


def dylora_step_factors(
    down: torch.Tensor, up: torch.Tensor, k: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of one training step at rank ``k``: the first ``k−bs`` ranks detached, the last block live.

    ``down (r, I, *k)``, ``up (O, r, …)`` → ``(k, I, *k)``, ``(O, k, …)``; gradients reach only the
    ranks ``[k−bs, k)``.
    """
    lo = k - block_size
    d = torch.cat([down[:lo].detach(), down[lo:k]], dim=0)
    u = torch.cat([up[:, :lo].detach(), up[:, lo:k]], dim=1)
    return d, u


def check_block_size(r: int, block_size: int) -> None:
    """Raise :class:`InvalidConfigError` unless ``block_size`` divides ``r``."""
    if block_size < 1 or r % block_size:
        raise InvalidConfigError(f"block_size: {block_size} must divide the rank dim={r}")


class DyLoRA(LoRA):
    name = "dylora"
    aliases = ()
    description = "dynamic-rank LoRA: rank blocks trained so any prefix works (saved as LoRA)"
    detector_keys = ()
    tensor_names = (DOWN, UP, "alpha")
    scalar_target = None
    supports_dora = False
    default_bypass = True

    def check_options(self, opts: AdapterOptions, layer: LayerInfo) -> None:
        super().check_options(opts, layer)
        check_block_size(opts.dim, opts.block_size)
        if opts.use_tucker:
            raise InvalidConfigError("use_tucker: not supported by dylora")
        if opts.rs_lora:
            raise InvalidConfigError("rs_lora: not supported by dylora (its scale is α per rank block)")

    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``lora_down`` Kaiming-uniform ``(r, I, *k)``, ``lora_up`` zero ``(O, r)``, alpha ``α·block_size``."""
        self.check_options(opts, layer)
        r = opts.dim
        return {
            DOWN: init.kaiming(r, layer.in_features, *layer.kernel_size),
            UP: init.zeros(layer.out_features, r),
            "alpha": alpha_tensor(opts.effective_alpha() * opts.block_size),
        }

    def training_tensors(self, t: Tensors, opts: AdapterOptions) -> Tensors:
        """One training step's factors: a random number of rank blocks, only the last one trained.

        The stored alpha is α·bs, so the LoRA scale α_file/k of the truncated factors is α/(blocks used),
        the scale DyLoRA trains with.
        """
        r = int(t[DOWN].shape[0])
        k = sample_rank_blocks(r, opts.block_size)
        down, up = dylora_step_factors(t[DOWN], t[UP], k, opts.block_size)
        return {**t, DOWN: down, UP: up}
