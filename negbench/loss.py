"""Every registered sampler as a drop-in contrastive loss for your own training loop (issue 12).

    criterion = negbench.ContrastiveLoss("emc2", num_items=N, beta=5.0)
    loss = criterion(z1, z2, index)          # z1, z2: (B, d) encoder outputs; index: (B,) item ids
    loss.backward()

The B items of a call give A = 2B anchors, anchor ``2k + v`` being view v (``z1`` for v = 0,
``z2`` for v = 1) of item ``index[k]``, each L2-normalised inside, e = z/‖z‖. The sampler
returns its detached weight matrix W (A × C) over the candidates (the A anchors, then any
extras it asked for) and the loss is the surrogate of DESIGN §1.3, the runner's loss,

    ℓ = β/A · Σ_a [ Σ_c W_ac <e_a, e_c>  -  <e_a, e_a⁺> ],

whose gradient is the sampler's estimate of ∇F, the gradient of the global contrastive loss.

**State.** The sampler's per-item state tensors (``Sampler.state_attributes``) are the
module's buffers; the rest (its step counters, its random generator, the accumulators of
:meth:`ContrastiveLoss.diagnostics`, a pending refresh) is the module's extra state. So
``criterion.state_dict()`` goes into your checkpoint and ``load_state_dict`` resumes exactly
(bit-identical on the CPU). ``.to(device)`` moves the state; the generator is re-seeded on the
new device from the old one (CPU and CUDA generators have different streams). The module keeps
no reference to your model.

**Extras.** ``importance``, ``neg_cache``, ``full_softmax`` and ``emc2 stale=refresh`` need more
than the batch: pass ``encode=fn`` *at call time* (so the module never holds the model: no
reference cycle, nothing unpicklable in it), ``fn(items, views) -> (k, d)`` encoder outputs of
view ``views[j]`` of item ``items[j]``, where view -1 means any view (a fresh augmentation; on a
finite view set a uniformly random one). It is called with gradients for the extra candidates,
and under ``torch.no_grad()`` for cache refreshes — which the runner does after the optimiser
step, so here they run at the start of the next call, with the parameters that step produced.

**Finite view sets.** With ``num_views=m`` (the data set has m fixed views per item) pass
``views`` (B, 2): the view ids of ``z1`` and ``z2`` (default 0 and 1); ``full_softmax`` needs it.

**Distributed.** Under ``torch.distributed`` with several processes, each rank passes its own
batch (the same B on every rank, e.g. a ``DistributedSampler`` with ``drop_last=True``); the
embeddings, indices and views are all-gathered in rank order, with gradients, and every rank
runs the sampler on the whole global batch with an identically seeded generator, so W and the
state are identical everywhere. Every rank returns the *global* ℓ; the gather's backward sums
each rank's ∂ℓ/∂z over ranks, so DDP's gradient averaging yields exactly the single-process
gradient of ℓ on the concatenated batch. Extras are encoded sharded across ranks and gathered.

**Bad input** raises :class:`negbench.UserError` (a ``ValueError``) naming the problem, before
any state changes. The checks on values (index range, duplicates, non-finite z) cost one host
synchronisation per call; ``validate=False`` skips them (the sampler itself never synchronises
on CUDA, except ``emc2 stale=refresh``, whose number of extras is data-dependent).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negbench import distributed
from negbench.errors import UserError
from negbench.objective import surrogate_loss
from negbench.registry import SAMPLERS
from negbench.sampler import Batch, EncodeFn, Sampler, SamplerContext, join_candidates

__all__ = ["ContrastiveLoss"]


class ContrastiveLoss(nn.Module):
    """A registered negative sampler as a loss module (see the module docstring).

    ``sampler``: a registered name (``negbench list samplers``); ``num_items``: the size N of
    the data set the indices refer to; ``beta``: the inverse temperature β = 1/τ; ``num_views``:
    m for a finite view set, None (default) for fresh random augmentations; ``dim``: the
    embedding dimension d (taken from the first batch when None); ``seed``: the sampler's
    generator (the same on every rank); ``gather_distributed``: all-gather across ranks when
    ``torch.distributed`` runs several processes; ``validate``: the value checks (one host
    synchronisation); ``sampler_params``: the sampler's parameters (``negbench list samplers``).
    """

    def __init__(self, sampler: str = "emc2", num_items: int | None = None, beta: float = 5.0, *,
                 num_views: int | None = None, dim: int | None = None, seed: int = 0,
                 gather_distributed: bool = True, validate: bool = True, **sampler_params: Any) -> None:
        super().__init__()
        if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral) or num_items < 2:
            raise UserError(f"num_items must be the number of items in your data set (an integer >= 2), got {num_items!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise UserError(f"beta must be a finite number > 0 (the inverse temperature 1/tau), got {beta!r}")
        if num_views is not None and (isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 2):
            raise UserError(f"num_views must be None (random augmentations) or an integer >= 2, got {num_views!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise UserError(f"dim must be None or a positive integer (the embedding dimension), got {dim!r}")
        self.sampler: Sampler = SAMPLERS.get_class(sampler)(**sampler_params)
        self.num_items, self.num_views, self.beta = int(num_items), num_views, float(beta)
        self.seed, self.gather_distributed, self.validate = seed, gather_distributed, validate
        self._dim_given = dim is not None
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)
        self._pending_refresh = False
        self._steps = 0  # successful calls: the embedding dimension is fixed after the first
        self._bind(dim or 0, torch.device("cpu"), torch.Generator().manual_seed(seed))

    # ---- binding and the buffers ------------------------------------------------------------------
    def _bind(self, dim: int, device: torch.device, generator: torch.Generator,
              state: dict[str, Any] | None = None, diagnostics: dict[str, Any] | None = None) -> None:
        """(Re)bind the sampler to ``dim`` and ``device`` and make its state tensors the buffers."""
        self.sampler.bind(SamplerContext(self.num_items, self.num_views, self.beta, dim, device, generator))
        if state is not None:
            self.sampler.load_state_dict(state)
        if diagnostics is not None:
            self.sampler.load_diagnostics_state(diagnostics)
        self._pull()

    def _pull(self) -> None:
        """Make the module's buffers the sampler's current state tensors (it may replace them)."""
        for name in self.sampler.state_attributes:
            self._buffers[name] = getattr(self.sampler, name)

    def _push(self) -> None:
        """Hand the buffers (loaded, or moved by nn.Module) back to the sampler."""
        for name in self.sampler.state_attributes:
            setattr(self.sampler, name, self._buffers[name])

    @property
    def context(self) -> SamplerContext:
        assert self.sampler.context is not None
        return self.sampler.context

    @property
    def generator(self) -> torch.Generator:
        return self.sampler.generator

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "ContrastiveLoss":  # type: ignore[override]
        # Only the device is taken from ``fn`` (dtype conversions would corrupt integer chain states
        # and stored scores): the sampler is re-bound there with its state and a generator re-seeded
        # from the old one.
        device = fn(self._device_marker).device
        self._device_marker = torch.empty(0, device=device)
        if device != self.context.device:
            self._push()
            seed = int(torch.randint(2**62, (1,), generator=self.generator, device=self.generator.device))
            generator = torch.Generator(device=device).manual_seed(seed)
            self._bind(self.context.dim, device, generator, self.sampler.state_dict(), self.sampler.diagnostics_state())
        return self

    # ---- checkpoints -----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        self._push()
        state = self.sampler.state_dict()
        return {
            "sampler": self.sampler.name, "sampler_params": dict(self.sampler.config), "num_items": self.num_items,
            "num_views": self.num_views, "dim": self.context.dim, "beta": self.beta,
            "other_state": {k: v for k, v in state.items() if k not in self.sampler.state_attributes},
            "generator": self.generator.get_state(), "generator_device": self.generator.device.type,
            "diagnostics": self.sampler.diagnostics_state(), "pending_refresh": self._pending_refresh,
            "steps": self._steps,
        }

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:  # type: ignore[override]
        # Checked before nn.Module copies any buffer: a checkpoint of another loss changes nothing.
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            if extra.get("dim") != self.context.dim and not self._dim_given and self._steps == 0:
                # this module has not seen a batch yet: take the checkpoint's embedding dimension
                self._bind(int(extra["dim"]), self.context.device, self.generator)
            mine = {"sampler": self.sampler.name, "sampler_params": dict(self.sampler.config),
                    "num_items": self.num_items, "num_views": self.num_views, "dim": self.context.dim, "beta": self.beta}
            for key, value in mine.items():
                if extra.get(key) != value:
                    raise UserError(f"the checkpoint's loss has {key}={extra.get(key)!r} but this ContrastiveLoss has "
                                    f"{key}={value!r}; construct it as the checkpoint's was")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._push()
        self.sampler.load_state_dict({**{n: self._buffers[n] for n in self.sampler.state_attributes},
                                      **state["other_state"]})
        self.sampler.load_diagnostics_state(state["diagnostics"])
        if state["generator_device"] == self.generator.device.type:
            self.generator.set_state(state["generator"])
        else:
            warnings.warn(f"the checkpoint's random generator was on {state['generator_device']}, this loss is on "
                          f"{self.generator.device.type}: its random stream continues differently", stacklevel=2)
        self._pending_refresh = bool(state["pending_refresh"])
        self._steps = int(state["steps"])
        self._pull()

    # ---- the loss --------------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float | None]:
        """The sampler's diagnostics accumulated since the last call (e.g. emc2's
        acceptance rate and stale fraction; the keys its ``diagnostic_metrics`` declare), then reset."""
        self._push()
        return self.sampler.diagnostics()

    def state_bytes(self) -> int:
        """Exact bytes of the sampler's per-item state."""
        self._push()
        return self.sampler.state_bytes()

    def forward(self, z1: Tensor, z2: Tensor, index: Tensor, *, views: Tensor | None = None,
                encode: EncodeFn | None = None) -> Tensor:
        """The surrogate loss ℓ of the batch (a scalar with gradients to ``z1``, ``z2`` and,
        through ``encode``, the extras). See the module docstring for the arguments."""
        views = self._check_shapes(z1, z2, index, views)
        if encode is None and self.sampler.needs_encoder():
            raise UserError(f"sampler {self.sampler.name!r} with these parameters needs embeddings beyond the batch; "
                            "pass encode=fn, fn(items, views) -> (k, d) encoder outputs: criterion(z1, z2, index, encode=fn)")
        if self.context.dim != z1.shape[1] and (self._dim_given or self._steps):
            raise UserError(f"z1 and z2 have dimension {z1.shape[1]} but this loss has dim={self.context.dim}; "
                            "pass the embeddings it was built (or trained) for")
        gather = self.gather_distributed and distributed.world_size() > 1
        pairs = torch.stack([F.normalize(z1, dim=1), F.normalize(z2, dim=1)], dim=1)  # (B, 2, d)
        local_emb = pairs.reshape(-1, pairs.shape[2])  # anchor 2k + v = view v of item k
        items, views = index.long(), views.long()
        if gather:
            size = distributed.world_size() * index.shape[0]
            local_emb, items = distributed.gather_rows(local_emb, 2 * size), distributed.gather_rows(items, size)
            views = distributed.gather_rows(views, size)
        if self.validate:
            self._check_values(local_emb, items, views)
        if self.context.dim != z1.shape[1]:  # the first batch sets the dimension
            self._bind(z1.shape[1], self.context.device, self.generator)
        self._push()

        anchor_emb = local_emb
        if self._pending_refresh:
            with torch.no_grad():
                self.sampler.refresh(lambda it, vw: self._encode(encode, it, vw, anchor_emb, gather))  # type: ignore[arg-type]
            self._pending_refresh = False
        batch = Batch.from_anchors(items.repeat_interleave(2), views.reshape(-1), anchor_emb.detach())
        generator_state, diagnostics = self.generator.get_state(), self.sampler.diagnostics_state()
        extras = self.sampler.propose(batch)
        try:  # the runner's one way for extras to join the candidates (stale ones need no encode)
            batch, candidate_emb = join_candidates(
                batch, anchor_emb, extras, lambda it, vw: self._encode(encode, it, vw, anchor_emb, gather),  # type: ignore[arg-type]
                resolve_views=lambda vw: vw)  # free views (-1) are the user's encode's to choose
        except UserError:  # a wrong encode output: undo the draw, as if never called
            self.generator.set_state(generator_state)
            self.sampler.load_diagnostics_state(diagnostics)
            raise
        with torch.no_grad():
            sims = batch.anchor_emb @ candidate_emb.detach().T
            weights = self.sampler.weigh(sims, batch)
        self._pending_refresh = type(self.sampler).refresh is not Sampler.refresh
        self._steps += 1
        self._pull()
        return surrogate_loss(anchor_emb, candidate_emb, weights, batch.positive, self.beta)

    def _encode(self, encode: EncodeFn, items: Tensor, views: Tensor, anchor_emb: Tensor, gather: bool) -> Tensor:
        """Normalised embeddings of the extras, (k, d); across ranks each encodes its shard."""
        total = items.numel()
        if gather:
            rows = distributed.shard(total)
            if rows.stop > rows.start:
                local = encode(items[rows], views[rows])
            else:  # an empty shard still takes part in the gather (and its backward)
                local = anchor_emb[:0] if torch.is_grad_enabled() else anchor_emb.detach()[:0]
            expected = rows.stop - rows.start
        else:
            local, expected = encode(items, views), total
        d = anchor_emb.shape[1]
        if not isinstance(local, Tensor) or tuple(local.shape) != (expected, d):
            got = tuple(local.shape) if isinstance(local, Tensor) else type(local).__name__
            raise UserError(f"encode(items, views) returned {got} for {expected} items; it must return "
                            f"({expected}, {d}) encoder outputs, one row per requested item")
        local = F.normalize(local.to(anchor_emb.dtype), dim=1)
        return distributed.gather_rows(local, total) if gather else local

    # ---- bad input ---------------------------------------------------------------------------------
    def _check_shapes(self, z1: Tensor, z2: Tensor, index: Tensor, views: Tensor | None) -> Tensor:
        """The checks that need no host synchronisation; returns the (B, 2) view ids."""
        for name, z in (("z1", z1), ("z2", z2), ("index", index)):
            if not isinstance(z, Tensor):
                raise UserError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z1.dim() != 2 or not z1.is_floating_point() or not z2.is_floating_point():
            raise UserError(f"z1 and z2 must be floating-point (B, d) embeddings, got {z1.dtype} {tuple(z1.shape)}")
        if z1.shape != z2.shape:
            raise UserError(f"z1 and z2 must have the same shape (the two views of the same B items), got "
                            f"{tuple(z1.shape)} and {tuple(z2.shape)}")
        b = z1.shape[0]
        if b < 2:
            raise UserError(f"a batch needs at least 2 items (an item's negatives are the other items' views), got B={b}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise UserError(f"index must be an integer tensor of item ids, got dtype {index.dtype}; pass index.long()")
        if tuple(index.shape) != (b,):
            raise UserError(f"index must have shape ({b},), one item id per row of z1, got {tuple(index.shape)}")
        device = self.context.device
        for name, t in (("z1", z1), ("z2", z2), ("index", index)):
            if t.device != device:
                raise UserError(f"{name} is on {t.device} but the loss is on {device}; move the loss with criterion.to({name}.device)")
        if views is None:
            return (torch.arange(2 * b, device=device) % 2).reshape(b, 2)
        if self.num_views is None:
            raise UserError("views is only for finite view sets; construct the loss with num_views=m, or drop views")
        if not isinstance(views, Tensor) or views.is_floating_point() or tuple(views.shape) != (b, 2) or views.device != device:
            raise UserError(f"views must be an integer ({b}, 2) tensor on {device}: the view ids of z1 and z2")
        return views

    def _check_values(self, emb: Tensor, items: Tensor, views: Tensor) -> None:
        """Index range, duplicates, view ids, finite embeddings: one host synchronisation."""
        ordered = items.sort().values
        m = self.num_views or 2
        flags = torch.stack([
            (items.min() < 0) | (items.max() >= self.num_items), (ordered[1:] == ordered[:-1]).any(),
            ~torch.isfinite(emb).all(), (views.min() < 0) | (views.max() >= m) | (views[:, 0] == views[:, 1]).any(),
        ]).tolist()
        messages = [
            f"index holds item ids outside [0, {self.num_items}); ids must index your data set of num_items={self.num_items}",
            "index holds the same item twice in one batch (across all ranks); draw each item at most once per batch",
            "z1 or z2 holds NaN or infinite values; check the encoder (e.g. lower the learning rate)",
            f"views must hold two different view ids in [0, {m}) per item",
        ]
        for bad, message in zip(flags, messages):
            if bad:
                raise UserError(message)

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.sampler.config.items())
        return f"{self.sampler.name!r}, num_items={self.num_items}, beta={self.beta:g}" + (f", {params}" if params else "")
