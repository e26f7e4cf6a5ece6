"""The sampler interface (DESIGN §1.3, §2.2).

Per training step the runner draws B items and two views of each: A = 2B anchors, ordered so
that anchor ``2k + v`` is view ``v`` of the k-th batch item. The candidates are those A
anchor views (in the same order) followed by any extra views the sampler asked for. A
sampler returns a detached weight matrix W (A × C), non-negative unless the sampler sets
``signed_weights``; the training loss is

    ℓ = β/A · Σ_a [ Σ_c W_ac <e_a, e_c>  -  <e_a, e_a⁺> ]

and its gradient is the sampler's estimate of ∇F. Per step the runner calls, in order:

1. ``propose(batch)``   → extra views (default: none): views to encode with gradients, or
   stale, gradient-free embeddings given with them (``Extras.embeddings``);
2. :func:`join_candidates` builds the candidate set (the runner, ``negative_distribution`` and
   ``negbench bench`` all go through it);
3. ``weigh(sims, batch)`` → W, updating the sampler's per-item state;
4. ``refresh(encode)``  → optional no-grad re-encoding (caches).

**Signed weights.** A sampler whose published loss is not a softmax cross-entropy may need
weights of either sign to make ∇ℓ equal that loss's gradient: the debiased estimators (``dcl``,
``hcl``) subtract τ⁺·N times the positive's term, so the positive column gets a negative weight,
and ``hcl``'s importance weights, differentiated, give easy negatives a negative one. Such a
sampler sets ``signed_weights = True``; the conformance suite's W ≥ 0 rule holds for every
other sampler (W must still be finite and 0 off the valid pairs and the positive).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from negbench.errors import UserError
from negbench.metric_registry import Metric
from negbench.params import Configurable

#: ``encode(items, views) -> embeddings`` without gradients; view -1 lets the task choose.
EncodeFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SamplerContext:
    """What a sampler knows of the run it is bound to."""

    num_items: int
    num_views: int | None  # m on finite-view tasks; None with fresh random augmentations
    beta: float
    dim: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generator: torch.Generator | None = None

    @property
    def finite_views(self) -> bool:
        return self.num_views is not None


@dataclass
class Extras:
    """Extra candidate views a sampler asks for. ``views[k] = -1`` lets the task choose the
    view (a fresh augmentation, or a uniformly random fixed view). ``owner[k]`` (optional)
    restricts extra k to one anchor; without it every anchor may use it.

    ``embeddings`` (optional, K × d) makes the extras **stale constants**: candidates given by
    the sampler as detached embeddings (e.g. a queue of past anchors) instead of views to
    encode. They are not encoded and carry no gradient — ∂ℓ/∂e_c reaches only the anchors
    through them — and ``views`` must then name real views (no -1), which label the columns
    (e.g. for ``sampling_tv``). Every rank holds the same sampler state, so they need no
    gathering in distributed runs."""

    items: Tensor
    views: Tensor
    owner: Tensor | None = None
    embeddings: Tensor | None = None

    @property
    def stale(self) -> bool:
        return self.embeddings is not None


@dataclass
class Batch:
    """One step's anchors and candidates (ids only, plus the detached anchor embeddings)."""

    anchor_items: Tensor  # (A,) item id of each anchor
    anchor_views: Tensor  # (A,) view id; with random augmentations 0/1 = draw order
    positive: Tensor  # (A,) candidate column of each anchor's positive
    anchor_emb: Tensor  # (A, d) detached
    candidate_items: Tensor  # (C,) the first A candidates are the anchors themselves
    candidate_views: Tensor  # (C,)
    valid: Tensor  # (A, C) bool: candidate c may be a negative of anchor a

    @property
    def num_anchors(self) -> int:
        return int(self.anchor_items.shape[0])

    @property
    def in_batch_valid(self) -> Tensor:
        return self.valid[:, : self.num_anchors]

    @staticmethod
    def from_anchors(items: Tensor, views: Tensor, anchor_emb: Tensor) -> "Batch":
        """The in-batch candidate set: anchor ``2k+v`` has positive ``2k+1-v``; a candidate
        is valid when it is a view of another item."""
        num = items.shape[0]
        positive = torch.arange(num, device=items.device) ^ 1
        valid = items[:, None] != items[None, :]
        return Batch(items, views, positive, anchor_emb, items, views, valid)

    def with_extras(self, extras: Extras | None, extra_valid: Tensor | None = None) -> "Batch":
        """This batch with ``extras`` appended to the candidates. An extra is valid for an
        anchor of another item (and only for its owner, when it has one); ``extra_valid``
        (A × K) can restrict it further."""
        if extras is None or extras.items.numel() == 0:
            return self
        valid = self.anchor_items[:, None] != extras.items[None, :]
        if extras.owner is not None:
            anchors = torch.arange(self.num_anchors, device=valid.device)
            valid &= anchors[:, None] == extras.owner[None, :]
        if extra_valid is not None:
            valid &= extra_valid
        return replace(
            self,
            candidate_items=torch.cat([self.candidate_items, extras.items]),
            candidate_views=torch.cat([self.candidate_views, extras.views]),
            valid=torch.cat([self.valid, valid], dim=1),
        )


class Sampler(Configurable):
    """Base class of every negative sampler: per step it returns a non-negative weight matrix
    W over the candidates, and every sampler trains with the same surrogate

        ℓ = β/A · Σ_a [ Σ_c W_ac <e_a, e_c>  -  <e_a, e_a⁺> ]

    whose gradient is its estimate of ∇F (DESIGN §1.3). Subclasses set ``name`` (via
    ``@register_sampler``), ``description``, ``params``, ``test_params`` and the capability
    flags, name their per-item state tensors in ``state_attributes``, and implement
    :meth:`weigh` (and :meth:`propose` / :meth:`refresh` when they need extras or caches).
    The call order per step is in this module's docstring.

    Args:
        **params: the values of the parameters declared in ``params`` (defaults otherwise).

    Example:
        >>> from negbench import Sampler, register_sampler
        >>> @register_sampler("my_uniform")
        ... class MyUniform(Sampler):
        ...     description = "equal weight on every valid in-batch negative"
        ...     def weigh(self, sims, batch):
        ...         valid = batch.in_batch_valid.to(sims.dtype)
        ...         weights = sims.new_zeros(sims.shape)
        ...         weights[:, : batch.num_anchors] = valid / valid.sum(1, keepdim=True).clamp_min(1)
        ...         return weights
    """

    kind_label: ClassVar[str] = "sampler"
    #: W may hold negative entries (module docstring, "Signed weights"); False: W ≥ 0
    signed_weights: ClassVar[bool] = False
    #: needs a finite view set (exact over every view); refused on random-augmentation tasks
    requires_finite_views: ClassVar[bool] = False
    #: each row of W sums to 1 (0 for an anchor without candidates); False for reweighting
    #: estimators (e.g. sogclr) whose rows sum to a random positive number
    normalised_weights: ClassVar[bool] = True
    #: W may have negative entries (debiased estimators, e.g. dcl/hcl, weigh the positive
    #: negatively); without it a negative weight breaks the weight contract (negbench.contract)
    signed_weights: ClassVar[bool] = False
    #: a row of W may be all zero although its anchor has candidates: the anchor got no
    #: negative this step (emc2 with stale=drop); without it such a row breaks the contract
    empty_rows: ClassVar[bool] = False
    #: the smallest batch B with which an anchor can get a negative at all: 2 for samplers that
    #: weigh only the in-batch candidates (at B = 1 an anchor's only candidates are its own
    #: views); 1 for those that draw extra candidates
    min_batch_size: ClassVar[int] = 1
    #: names of the tensor attributes that make up the per-item state (saved, counted)
    state_attributes: ClassVar[tuple[str, ...]] = ()
    #: names of the attributes :meth:`diagnostics` accumulates between two calls (tensors or
    #: plain values): saved in a checkpoint apart from the state, so that a run resumed in the
    #: middle of a metric window reports the same diagnostics; never counted in state_bytes
    diagnostic_attributes: ClassVar[tuple[str, ...]] = ()
    #: the metrics :meth:`diagnostics` returns, declared for the metric registry (name,
    #: description, better direction): tables, sorting and ``negbench list --metrics`` read them
    diagnostic_metrics: ClassVar[tuple[Metric, ...]] = ()
    #: parameter variants ``negbench compare --samplers all`` adds as rows of their own, each
    #: ``key=value[:key=value]`` (e.g. ``stale=refresh``)
    compare_variants: ClassVar[tuple[str, ...]] = ()

    context: SamplerContext | None = None

    def bind(self, context: SamplerContext) -> "Sampler":
        """Attach to a run (sizes, β, device, generator) and allocate the per-item state."""
        self.check_task(context.num_items, context.num_views)
        self.context = context
        self.generator = context.generator or torch.Generator(device=context.device)
        self.reset_state()
        return self

    def check_task(self, num_items: int, num_views: int | None) -> None:
        """Raise :class:`~negbench.errors.UserError` (one line, naming the fix) when this
        sampler, with its parameters, cannot run on a task of ``num_items`` items with
        ``num_views`` fixed views each (None: fresh random augmentations). The runner calls it
        before anything is written; :meth:`bind` calls it too. The default refuses a
        random-augmentation task when ``requires_finite_views``; override it (calling
        ``super()``) for parameter-dependent limits."""
        from negbench.resolution import check_finite_views  # the one finite-view rule

        check_finite_views(self, num_views is not None)

    def check_batch_size(self, batch_size: int) -> None:
        """Raise :class:`~negbench.errors.UserError` when a batch of ``batch_size`` items would
        leave every anchor without a negative (below ``min_batch_size``). The runner calls it
        before anything is written."""
        if batch_size < self.min_batch_size:
            raise UserError(
                f"sampler {self.name!r} needs --batch-size >= {self.min_batch_size}: with {batch_size} item(s) per "
                "step no anchor has an in-batch negative (its only candidates are views of its own item) and "
                f"nothing is learnt; use --batch-size {self.min_batch_size} or more"
            )

    def check_view_mode(self, param: str, num_views: int | None) -> None:
        """For a parameter taking ``auto|view|item`` (per-view or per-item state): ``view``
        needs a finite-view task."""
        if getattr(self, param) == "view" and num_views is None:
            raise UserError(
                f"{self.name} {param}=view needs a finite-view task; use --set {param}=item or {param}=auto"
            )

    def resolve_view_mode(self, param: str) -> tuple[str, int]:
        """``(mode, rows per item)`` of an ``auto|view|item`` parameter: ``auto`` is ``view``
        (one row per fixed view, m rows per item) on finite-view tasks and ``item`` (one row)
        with random augmentations."""
        assert self.context is not None, "bind() the sampler first"
        mode = getattr(self, param)
        if mode == "auto":
            mode = "view" if self.context.finite_views else "item"
        return mode, (self.context.num_views or 1) if mode == "view" else 1

    def reset_state(self) -> None:
        """Allocate fresh per-item state; samplers without state need not override it."""

    # ---- the per-step protocol -------------------------------------------------------
    def propose(self, batch: Batch) -> Extras | None:
        """Extra candidate views to encode with gradients (default none)."""
        return None

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        """The weight matrix W (A × C), 0 on invalid pairs (except, optionally, the positive),
        non-negative unless ``signed_weights``. ``sims`` holds the detached cosine similarities
        <e_a, e_c>."""
        raise NotImplementedError

    def refresh(self, encode: EncodeFn) -> None:
        """No-grad re-encoding of cached rows (default nothing)."""

    def negatives_per_anchor(self, batch_size: int) -> int | None:
        """How many negatives one anchor's weights rest on in one step of ``batch_size`` items:
        the sample size of the i.i.d. noise floor ``sampling_tv_floor`` (a probe row anchored
        in k steps is compared with k times this many exact i.i.d. draws). Default: the 2B
        in-batch candidates. Samplers that draw a fixed number of negatives (``importance``'s
        K extras, ``neg_cache``'s K per anchor) return it; ``None`` means the weights are the
        exact distribution itself (no sampling noise: floor 0)."""
        return 2 * batch_size

    def diagnostics(self) -> dict[str, float]:
        """Sampler-specific metrics accumulated since the last call (then reset); every key is
        declared in ``diagnostic_metrics``."""
        return {}

    def needs_encoder(self) -> bool:
        """Whether, with its parameters, this sampler may ask for extras (:meth:`propose`) or
        re-encode caches (:meth:`refresh`): then a library user must hand
        :class:`negbench.ContrastiveLoss` an ``encode`` callable. Default: whether the class
        overrides either method; override it when a parameter decides (e.g. ``emc2 stale``)."""
        cls = type(self)
        return cls.propose is not Sampler.propose or cls.refresh is not Sampler.refresh

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).clone() for name in self.state_attributes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.state_attributes:
            getattr(self, name).copy_(state[name])

    def state_bytes(self) -> int:
        """Exact bytes of the per-item state."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.state_attributes)

    def diagnostics_state(self) -> dict[str, Any]:
        """The accumulators behind :meth:`diagnostics` (``diagnostic_attributes``), copied."""
        return {
            name: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for name in self.diagnostic_attributes
            for value in (getattr(self, name),)
        }

    def load_diagnostics_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`diagnostics_state` (tensors onto the current ones' device and dtype)."""
        for name in self.diagnostic_attributes:
            value, current = state[name], getattr(self, name)
            if isinstance(current, torch.Tensor):
                value = value.to(device=current.device, dtype=current.dtype).clone()
            setattr(self, name, copy.deepcopy(value) if not isinstance(value, torch.Tensor) else value)

    # ---- helpers for subclasses ------------------------------------------------------
    @property
    def beta(self) -> float:
        assert self.context is not None, "bind() the sampler first"
        return self.context.beta

    def masked_softmax(self, sims: Tensor, valid: Tensor) -> Tensor:
        """softmax(β·sims) over the valid entries of each row; rows with none are all 0."""
        logits = (self.beta * sims).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        return torch.nan_to_num(weights, nan=0.0)


def join_candidates(
    batch: Batch,
    anchor_emb: Tensor,
    extras: Extras | None,
    encode: EncodeFn,
    resolve_views: Callable[[Tensor], Tensor],
    extra_valid: Tensor | None = None,
) -> tuple[Batch, Tensor]:
    """The candidate set of a step: ``(batch with the extras, candidate embeddings)``.

    The one place where extras become candidates. Encoded extras get their free views (-1)
    resolved by ``resolve_views`` and their embeddings from ``encode(items, views)`` (with
    gradients in training); stale extras (``extras.embeddings``) are appended as given,
    detached, in ``anchor_emb``'s dtype. ``extra_valid`` (A × K) restricts the extras' validity
    further (:meth:`Batch.with_extras`)."""
    if extras is None or extras.items.numel() == 0:
        return batch, anchor_emb
    if extras.stale:
        assert extras.embeddings is not None and not bool((extras.views < 0).any()), "stale extras name their views"
        extra_emb = extras.embeddings.detach().to(device=anchor_emb.device, dtype=anchor_emb.dtype)
    else:
        extras = replace(extras, views=resolve_views(extras.views))
        extra_emb = encode(extras.items, extras.views)
    return batch.with_extras(extras, extra_valid), torch.cat([anchor_emb, extra_emb])
