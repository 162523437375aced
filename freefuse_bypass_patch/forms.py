"""Every adapter type in factored form on a Linear: what it adds to the output, never a full-size delta.

ComfyUI's merge code (``comfy/weight_adapter/*.py`` and ``base.weight_decompose``) is the
reference, quirks included. Each form works on the output rows its target patches (a fused
slice or the whole weight) and is built for one (device, dtype). One protocol, with defaults:

* ``low_rank()``: (up, down) with strength and scale folded in, for forms that are exactly
  a low-rank product (LoRA, GLoRA, DoRA-over-LoRA's inner): the hook groups those in one mm;
* ``add_(x, rows, mask)``: adds the term in place (forms that do not read the output);
* ``update_(x, rows, bias)``: rewrites the rows in place (forms with ``reads_output``: DoRA,
  OFT, BOFT, which read ``y = W' x`` on those rows, bias excluded);
* ``contribution(x, y)``: the term itself, which both defaults use;
* ``prepare(columns)``: forms with ``needs_weight`` (DoRA, GLoRA) read W', the weight as
  patched by the adapters before them, once, from column chunks (transient), and keep one
  vector or an (out, r) matrix.

Conv forms are in :mod:`.conv_forms`. Which adapter gets which form, and which gets none
(a transient merge-code delta, a merged patch or a refusal), is decided in :mod:`.slots`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# (first input column, last + 1, W' on the form's rows for those input columns: (cols, length) fp32)
Columns = Callable[[], Iterator[Tuple[int, int, torch.Tensor]]]


def to32(tensor: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.to(device=device, dtype=torch.float32)


def alpha_over(alpha, rank: Optional[int]) -> float:
    return float(alpha) / rank if alpha is not None and rank else 1.0


class Form:
    """One adapter on rows ``[start, start + length)`` of one Linear weight (out, in)."""

    reads_output = False  # contribution depends on y (DoRA, OFT, BOFT)
    needs_weight = False  # prepare() must see the effective weight before it (DoRA, GLoRA)

    def __init__(self, adapter: Any, strength: float, start: int, length: int, in_features: int, device):
        self.strength = float(strength)
        self.start, self.length, self.in_features = start, length, in_features
        self.device = device

    def prepare(self, columns: Columns) -> None:
        """Read the effective weight before this adapter (only called when ``needs_weight``)."""

    def factors(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(up (length, R), down (R, in)) with diff = up·down, for diffs that are exactly that; else None."""
        return None

    def low_rank(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``factors()`` with strength and scale folded into down, or None."""
        pair = self.factors()
        return None if pair is None else (pair[0], pair[1] * (self.strength * self.plain_scale))

    def diff(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """The merge code's ``lora_diff`` applied to x (before strength, unless the merge code puts it inside)."""
        raise NotImplementedError

    # scale of diff in the plain (non-DoRA) merge: weight += strength * plain_scale * diff
    plain_scale = 1.0

    # the alpha DoRA scales this adapter's diff by (weight_decompose's ``alpha``): the plain scale;
    # OFT and BOFT pass their raw alpha (see their constructors)
    @property
    def dora_alpha(self) -> float:
        return self.plain_scale

    def contribution(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        return self.diff(x, y) * (self.strength * self.plain_scale)

    def add_(self, x: torch.Tensor, rows: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """rows += the term (times a per-token ``mask``): for forms that do not read the output."""
        add_masked(rows, self.contribution(x, None), mask)

    def update_(self, x: torch.Tensor, rows: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """rows (= W' x + b on these rows) rewritten in place: for forms with ``reads_output``."""
        y = rows - bias if bias is not None else rows.clone()
        rows.add_(self.contribution(x, y))

    def cast(self, device, dtype) -> "Form":
        """A copy whose tensors are on ``device`` in ``dtype`` (the hook keeps one per compute dtype)."""
        copy = object.__new__(type(self))
        copy.__dict__.update({k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v
                              for k, v in self.__dict__.items()})
        copy.device = device
        return copy

    def tensors(self) -> List[torch.Tensor]:
        return [v for v in self.__dict__.values() if isinstance(v, torch.Tensor)]


class LoRAForm(Form):
    """LoRA: ΔW = (α/r)·up·down, applied as up·(down·x)."""

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        v = adapter.weights
        self.up, self.down = to32(v[0], device).flatten(1), to32(v[1], device).flatten(1)
        self.plain_scale = alpha_over(v[2], self.down.shape[0])

    def factors(self):
        return self.up, self.down

    def diff(self, x, y):
        return F.linear(F.linear(x, self.down), self.up)


class _LoHaFactors(Form):
    """The four LoHa factors and the merge code's scale, alpha / the rank of w1."""

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        w1a, w1b, alpha, w2a, w2b = adapter.weights[:5]
        self.w1a, self.w1b, self.w2a, self.w2b = (to32(t, device) for t in (w1a, w1b, w2a, w2b))
        self.plain_scale = alpha_over(alpha, w1b.shape[0])


class LoHaForm(_LoHaFactors):
    """LoHa: (A1·B1) ⊙ (A2·B2) = P·Q with P = A1 ⊙row A2 (out, r1·r2) and Q = B1 ⊙col B2.

    P and Q are r1·r2 wide, larger than the four factors, so they are formed in the compute
    dtype inside each forward (elementwise, one module at a time) and dropped.
    """

    @staticmethod
    def factored_is_smaller(adapter, out_features: int, in_features: int) -> bool:
        """The product form pays r1·r2·(out + in) against out·in for the dense delta."""
        v = adapter.weights
        return v[0].shape[1] * v[3].shape[1] * (out_features + in_features) < out_features * in_features

    def product(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P, Q), transient."""
        p = (self.w1a[:, :, None] * self.w2a[:, None, :]).flatten(1)
        q = (self.w1b[:, None, :] * self.w2b[None, :, :]).flatten(0, 1)
        return p, q

    def diff(self, x, y):
        p, q = self.product()
        return F.linear(F.linear(x, q), p)

    def add_(self, x, out_rows, mask=None):
        """out_rows += s·scale·P·(Q·x), the mask (if any) applied in rank space: no output-size temporary."""
        p, q = self.product()
        z = F.linear(x, q * (self.strength * self.plain_scale))
        if mask is not None:
            z.mul_(mask)
        out_rows.addmm_(z, p.t())


class DenseLoHaForm(_LoHaFactors):
    """LoHa whose product form would be larger than the weight: its delta is formed in the
    compute dtype inside each forward and dropped at once (one module at a time)."""

    def diff(self, x, y):
        return F.linear(x, (self.w1a @ self.w1b) * (self.w2a @ self.w2b))


class LoKrForm(Form):
    """LoKr: kron(w1, w2)·x = w1 · X · w2ᵀ with x viewed as X (in1, in2): two small matmuls."""

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        self.w1, self.w2, low, self.plain_scale = lokr_factors(adapter, device)
        self.w2a, self.w2b = low if low is not None else (None, None)  # kept low-rank: x·w2ᵀ = (x·w2bᵀ)·w2aᵀ

    @staticmethod
    def fits(adapter, length: int, in_features: int) -> bool:
        """A Linear LoKr whose Kronecker shape is the target's (a Tucker core is conv-only: the
        merge code cannot apply it to a Linear, so neither do we)."""
        w1, w2, _, w1a, w1b, w2a, w2b, t2 = adapter.weights[:8]
        if t2 is not None or (w2 is not None and w2.dim() != 2):
            return False
        rows1, cols1 = w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1])
        rows2, cols2 = w2.shape if w2 is not None else (w2a.shape[0], w2b.shape[1])
        return rows1 * rows2 == length and cols1 * cols2 == in_features

    def _right(self, x: torch.Tensor) -> torch.Tensor:
        """X·w2ᵀ: (T, in1, out2)."""
        xs = x.unflatten(-1, (self.w1.shape[1], -1))
        if self.w2 is not None:
            return F.linear(xs, self.w2)
        return F.linear(F.linear(xs, self.w2b), self.w2a)

    def diff(self, x, y):
        return torch.matmul(self.w1, self._right(x)).flatten(-2)

    def contribution(self, x, y):
        return torch.matmul(self.w1 * (self.strength * self.plain_scale), self._right(x)).flatten(-2)

    def add_(self, x, out_rows, mask=None):
        """out_rows (viewed (T, out1, out2)) += s·scale·w1 · (X·w2ᵀ), in place; the mask scales X·w2ᵀ."""
        z = self._right(x)
        if mask is not None:
            z.mul_(mask[:, :, None])
        rows = out_rows.unflatten(-1, (self.w1.shape[0], -1))
        w1 = self.w1 * (self.strength * self.plain_scale)
        rows.baddbmm_(w1.expand(z.shape[0], -1, -1), z)


def lokr_factors(adapter, device):
    """(w1, w2 or None, (w2_a, w2_b) or None, scale) as the merge code reads a LoKr: a low-rank
    w1 is formed (it is the small factor), w2's pair is kept; scale = alpha / the last pair's rank."""
    w1, w2, alpha, w1a, w1b, w2a, w2b = adapter.weights[:7]
    dim, low = None, None
    if w1 is None:
        dim = w1b.shape[0]
        w1 = to32(w1a, device) @ to32(w1b, device)
    if w2 is None:
        dim = w2b.shape[0]
        low = (to32(w2a, device), to32(w2b, device))
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return to32(w1, device), to32(w2, device), low, scale


class GLoRAForm(Form):
    """GLoRA: ΔW = W'·A·B + C·D, i.e. a LoRA whose up is W'·A (computed once) plus a plain LoRA."""

    needs_weight = True

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        v = adapter.weights
        a1, a2, b1, b2 = (to32(t, device).flatten(1) for t in v[:4])
        old = v[3].shape[1] == v[2].shape[0] == v[0].shape[0] == v[1].shape[1]
        if v[3].shape[0] == v[2].shape[1] == v[0].shape[1] == v[1].shape[0]:
            if not (old and v[1].shape[0] == length and length == in_features):
                old = False
        if old:  # LyCORIS' first layout: ΔW = W·a2·a1 + b2·b1
            self.a, self.b, self.c, self.d, rank = a2, a1, b2, b1, v[0].shape[0]
        else:
            self.a, self.b, self.c, self.d, rank = a1, a2, b1, b2, v[1].shape[0]
        self.plain_scale = alpha_over(v[4], rank)
        self.wa = None  # W'·A, from prepare()

    def prepare(self, columns):
        wa = torch.zeros(self.length, self.a.shape[1], device=self.device)
        for c0, c1, w_cols in columns():
            wa.addmm_(w_cols.t(), self.a[c0:c1])
        self.wa, self.a = wa, None

    def factors(self):
        return torch.cat([self.wa, self.c], dim=1), torch.cat([self.b, self.d], dim=0)

    def diff(self, x, y):
        return F.linear(F.linear(x, self.b), self.wa) + F.linear(F.linear(x, self.d), self.c)


class OFTForm(Form):
    """OFT: W += s·(R − I)ᵀ·W per block of output rows, so out − bias gets the same block map."""

    reads_output = True

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        blocks, _, alpha = adapter.weights[:3]
        self.raw_alpha = float(alpha or 0)
        self.r = _cayley(to32(blocks, device), self.raw_alpha)
        self.eye = torch.eye(self.r.shape[-1], device=device)

    @property
    def dora_alpha(self) -> float:
        return self.raw_alpha

    def _rotate(self, y, scale: float):
        return _per_block(y, (self.r - self.eye) * scale)

    def diff(self, x, y):
        return self._rotate(y, self.strength)  # the merge code puts strength inside the diff too

    def contribution(self, x, y):
        return self._rotate(y, self.strength * self.strength)


class BOFTForm(Form):
    """BOFT: butterfly stages of block rotations on the output rows, as merged applies them to W.

    Stage i mixes rows only within contiguous groups of 2^i·b rows, so the whole product is
    block-diagonal in groups of G = 2^(m-1)·b: its G×G blocks (rescale folded in) are built
    once from unit vectors and applied like OFT's. For a large G they would approach the
    weight's size, so the stages are then applied one by one in each forward.
    """

    reads_output = True
    max_group = 512

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        blocks, rescale, alpha = adapter.weights[:3]
        self.raw_alpha = float(alpha)
        r = _cayley(to32(blocks, device), alpha)
        if self.strength != 1:  # the merge code interpolates every stage
            r = r * self.strength + (1 - self.strength) * torch.eye(r.shape[-1], device=device)
        self.group = 2 ** (r.shape[0] - 1) * r.shape[-1]
        self.rescale = None if rescale is None else to32(rescale, device).flatten()
        self.r = self.blocks = None
        if self.group <= self.max_group and length % self.group == 0:
            units = torch.eye(self.group, device=device).repeat(length // self.group, 1)
            composite = _butterfly(r, units, self.rescale).unflatten(0, (-1, self.group))  # (groups, G, G)
            # transposed once here: _per_block maps y_j to Σ_j y_j m[j, i]
            self.blocks = (composite - torch.eye(self.group, device=device)).transpose(1, 2).contiguous()
            self.rescale = None
        else:
            self.r = r

    @property
    def dora_alpha(self) -> float:
        return self.raw_alpha

    def diff(self, x, y):
        if self.blocks is not None:
            return _per_block(y, self.blocks)
        return (_butterfly(self.r, y.t(), self.rescale) - y.t()).t()


def _per_block(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """y (..., K·n) mapped block by block: block k of the result is (block k of y) · m[k] (n, n)."""
    return torch.einsum("...kn,knm->...km", y.unflatten(-1, (m.shape[0], m.shape[1])), m).flatten(-2)


def _butterfly(r: torch.Tensor, rows: torch.Tensor, rescale: Optional[torch.Tensor]) -> torch.Tensor:
    """The merge code's butterfly stages applied to ``rows`` (out, ...), rows first."""
    size = r.shape[-1]
    for i in range(r.shape[0]):
        k = 2 ** i * (size // 2)
        rows = rows.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, size))
        rows = torch.einsum("b i j, b j ...-> b i ...", r[i], rows)
        rows = rows.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return rows if rescale is None else rows * rescale[:, None]


def _cayley(blocks: torch.Tensor, alpha) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q the skew part of ``blocks``, norm-constrained by alpha as merged does."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if alpha > 0:
        norm = torch.norm(q) + 1e-8
        if norm > alpha:
            q = q * alpha / norm
    return (eye + q) @ (eye - q).float().inverse()


class DoRAForm(Form):
    """DoRA on the output axis: W += s·(c ⊙rows (W' + α·diff) − W'), c = dora_scale / ‖W' rows‖.

    So out − bias becomes (1 + s(c − 1)) ⊙ y + s·c·α ⊙ diff(x): one vector per module.
    """

    reads_output = True
    needs_weight = True

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        v = adapter.weights
        inner = self.inner = _plain_class(adapter.name, v, adapter, length, in_features)(
            adapter, strength, start, length, in_features, device)
        self.dora_scale = to32(v[DORA_INDEX[adapter.name]], device).flatten()
        self.alpha = inner.dora_alpha
        self.gain = self.diff_scale = self.up = self.down = None  # from prepare()

    def prepare(self, columns):
        if self.inner.needs_weight:
            self.inner.prepare(columns)
        sumsq = torch.zeros(self.length, device=self.device)
        for _, _, w_cols in columns():
            sumsq += (w_cols * w_cols).sum(0)
        c = self.dora_scale / (sumsq.sqrt() + torch.finfo(torch.float32).eps)
        self.gain = 1 + self.strength * (c - 1)
        self.diff_scale = self.strength * self.alpha * c
        factors = self.inner.factors()
        if factors is not None:  # low-rank inner: fold the row scale into its up
            up, self.down = factors
            self.up, self.inner = up * self.diff_scale[:, None], None

    def cast(self, device, dtype):
        copy = Form.cast(self, device, dtype)
        copy.inner = self.inner.cast(device, dtype) if self.inner is not None else None
        return copy

    def tensors(self):
        return Form.tensors(self) + (self.inner.tensors() if self.inner is not None else [])

    def scaled_diff(self, x, y):
        if self.inner is None:
            return F.linear(F.linear(x, self.down), self.up)
        return self.diff_scale * self.inner.diff(x, y)

    def contribution(self, x, y):
        return (self.gain - 1) * y + self.scaled_diff(x, y)

    def update_(self, x: torch.Tensor, out_rows: torch.Tensor, bias_rows: Optional[torch.Tensor]) -> None:
        """out_rows ← gain ⊙ (out_rows − b) + b + scaled diff, in place (y is out_rows − b)."""
        y = None
        if self.inner is not None and self.inner.reads_output:
            y = out_rows - bias_rows if bias_rows is not None else out_rows.clone()
        d = None if self.inner is None else self.scaled_diff(x, y)
        out_rows.mul_(self.gain)
        if bias_rows is not None:
            out_rows.add_(bias_rows * (1 - self.gain))
        if d is None:
            out_rows.addmm_(F.linear(x, self.down), self.up.t())
        else:
            out_rows.add_(d)


# Where each adapter type keeps its DoRA scale in ``weights`` (ComfyUI's load() order).
DORA_INDEX = {"lora": 4, "loha": 7, "lokr": 8, "glora": 5, "oft": 3, "boft": 3}


def form_class(adapter: Any, out_rows: int, in_features: int) -> Optional[type]:
    """The factored form for ``adapter`` on ``out_rows`` rows of a Linear, or None (transient delta)."""
    name = getattr(adapter, "name", None)
    v = getattr(adapter, "weights", None)
    if name not in DORA_INDEX or not isinstance(v, (tuple, list)):
        return None
    base = _plain_class(name, v, adapter, out_rows, in_features)
    dora_scale = v[DORA_INDEX[name]] if len(v) > DORA_INDEX[name] else None
    if base is None or dora_scale is None:
        return base
    if not dora_on_rows(dora_scale, out_rows) or base is DenseLoHaForm:
        return None  # DoRA on the input axis, or a dora_scale merged broadcasts oddly: no factored form
    return DoRAForm


@functools.lru_cache(maxsize=64)  # one probe per (function, rows): a load asks once per module
def row_permutation(function: Callable, rows: int) -> Optional[Tuple[int, ...]]:
    """The fixed permutation of rows that a key map's diff function applies (ComfyUI's
    ``swap_scale_shift``: the two halves swapped), as ``perm`` with ``function(d) == d[perm]``;
    None for any other function. Probed in float64 on an index column and random columns."""
    index = torch.arange(rows, dtype=torch.float64)[:, None].repeat(1, 2)
    probe = torch.randn(rows, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        moved, probed = function(index), function(probe)
    except Exception:
        return None
    if not (isinstance(moved, torch.Tensor) and isinstance(probed, torch.Tensor)) or moved.shape != index.shape \
            or probed.shape != probe.shape:
        return None
    perm = moved[:, 0].round().long()
    if not torch.equal(moved[:, 0], perm.double()) or not torch.equal(perm.sort().values, torch.arange(rows)) \
            or not torch.equal(probed, probe[perm]):
        return None
    return tuple(perm.tolist())


class _RowPermuted:
    """Mixin for a form whose diff goes through a row permutation (``rows``): row i of the term is
    row ``rows[i]`` of the adapter's own. Low-rank ups are permuted once, when the hook builds them."""

    rows: Tuple[int, ...] = ()

    def factors(self):
        pair = super().factors()
        return None if pair is None else (pair[0][list(self.rows)], pair[1])

    def contribution(self, x, y):
        term = super().contribution(x, y)
        return term.index_select(-1, torch.as_tensor(self.rows, device=term.device))

    def add_(self, x, rows, mask=None):  # not the form's own in-place add: it writes unpermuted rows
        add_masked(rows, self.contribution(x, None), mask)


# (class, id(rows)) -> (rows, the permuted class): row_permutation hands out the same tuple for a
# (function, rows), so a load does not hash every row; the tuple is held, so its id is not reused
_PERMUTED: dict = {}


def permuted_rows(cls: type, perm: Tuple[int, ...]) -> Optional[type]:
    """``cls`` with its term's rows permuted, or None where merged applies the function elsewhere
    than to a plain additive diff (forms that read W' or the output: DoRA, GLoRA, OFT, BOFT)."""
    if cls.reads_output or cls.needs_weight:
        return None
    seen = _PERMUTED.get((cls, id(perm)))
    if seen is None:
        made = cls if perm == tuple(range(len(perm))) else type(cls.__name__, (_RowPermuted, cls),
                                                                {"rows": perm, "__doc__": cls.__doc__})
        seen = _PERMUTED[(cls, id(perm))] = (perm, made)
    return seen[1]


def dora_on_rows(dora_scale: torch.Tensor, out_rows: int) -> bool:
    """One magnitude per output row, shaped (out, 1, ...) as weight_decompose divides it by the
    row norms (out, 1, ...); a 1-D (out,) one broadcasts against them into (out, out) there."""
    return dora_scale.dim() >= 2 and dora_scale.shape[0] == out_rows and dora_scale[0].numel() == 1


def _plain_class(name, v, adapter, out_rows, in_features):
    if name == "lora":
        if v[3] is not None or v[5] is not None or v[0].dim() != 2 or v[1].dim() != 2:
            return None  # LoCon mid, reshape: conv forms
        return LoRAForm
    if name == "loha":
        if v[5] is not None or v[0].dim() != 2:
            return None  # Tucker LoHa
        return LoHaForm if LoHaForm.factored_is_smaller(adapter, out_rows, in_features) else DenseLoHaForm
    if name == "lokr":
        return LoKrForm if LoKrForm.fits(adapter, out_rows, in_features) else None
    if name == "glora":
        return GLoRAForm if v[0].dim() == 2 and v[2].dim() == 2 else None
    if name == "oft":
        return OFTForm if v[0].dim() == 3 and v[0].shape[0] * v[0].shape[1] == out_rows else None
    if name == "boft":  # alpha None: the merge code fails (and leaves the weight): so does the fallback
        if v[2] is None:
            return None
        return BOFTForm if v[0].dim() == 4 and v[0].shape[1] * v[0].shape[2] == out_rows else None
    return None


def effective_columns(weight32: Callable[[int, int], torch.Tensor], in_features: int,
                      earlier: Sequence[Form], rows: Tuple[int, int], chunk: int = 1024,
                      out_features: int = 0) -> Columns:
    """Column chunks of W' (the weight patched by ``earlier``) on ``rows``: (c0, c1, (cols, length)).

    ``weight32(c0, c1)`` gives W[:, c0:c1] in fp32. With earlier forms a chunk is a copy, kept to
    about 4 MiB (given ``out_features``), in the weight's own row order: additive low-rank forms
    add up·down[:, c0:c1] to it; any other form is applied to the unit inputs e_c0 … e_c1 exactly
    as in a forward, so any mix of adapter types composes.
    """
    if earlier and out_features:
        chunk = max(64, min(chunk, (1 << 20) // out_features))
    pairs = [form.low_rank() if not (form.reads_output or form.needs_weight) else None for form in earlier]

    def gen():
        eye = None
        for c0 in range(0, in_features, chunk):
            c1 = min(in_features, c0 + chunk)
            w = weight32(c0, c1)  # (out, cols)
            if earlier:  # a copy: earlier forms add into it, and it may be a view of the weight itself
                w = w.clone(memory_format=torch.contiguous_format)
                for form, pair in zip(earlier, pairs):
                    block = w[form.start:form.start + form.length]
                    if pair is not None:
                        block.addmm_(pair[0].to(w.dtype), pair[1][:, c0:c1].to(w.dtype))
                        continue
                    if eye is None:
                        eye = torch.zeros(chunk, in_features, device=w.device)
                    unit = eye[:c1 - c0]
                    unit[:, c0:c1] = torch.eye(c1 - c0, device=w.device)
                    view = block.t()
                    view += form.contribution(unit, view)
                    unit[:, c0:c1] = 0
            yield c0, c1, w[rows[0]:rows[0] + rows[1]].t()
    return gen


def add_masked(rows: torch.Tensor, term: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """rows += term, scaled per token by ``mask`` (tokens, 1) when there is one."""
    if mask is None:
        rows.add_(term)
    else:
        rows.addcmul_(term, mask)
