"""Every adapter type in factored form: what it adds to a Linear's output, never a full-size delta.

ComfyUI's merge code (``comfy/weight_adapter/*.py`` and ``base.weight_decompose``) is the
reference, quirks included. Each form works on the output rows its target patches (a fused
slice or the whole weight) and is built for one (device, dtype):

* ``contribution(x, y)`` is the term the adapter adds to those rows, for activations ``x``
  (tokens, in) and ``y = W' x`` on those rows, where ``W'`` is the weight as patched by the
  adapters before it (bias excluded). Only forms with ``reads_output`` look at ``y``.
* ``low_rank`` (up, down), strength and scale folded in, for forms that are exactly a
  low-rank product, so that the hook can group them with plain LoRAs in one matmul.
* forms with ``needs_weight`` read the weight they patch once, in ``prepare``, from column
  chunks of the effective weight (transient), and keep one vector or an (out, r) matrix.

Convs have their own forms for plain LoCon and LoKr (:func:`conv_form_class`). An adapter
with no form here (other conv adapters, LoRA ``reshape``, diff functions, slices on another
axis, DoRA on the input axis, Tucker LoHa/LoKr, unknown types) gets ``None``; the hook then
forms its delta transiently, one module at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# (first input column, last + 1, W' on the form's rows for those input columns: (cols, length) fp32)
Columns = Callable[[], Iterator[Tuple[int, int, torch.Tensor]]]


def _t(tensor: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.to(device=device, dtype=torch.float32)


def _alpha_over(alpha, rank: Optional[int]) -> float:
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

    def low_rank(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(up (length, R), down (R, in)) with strength and scale folded in, or None."""
        return None

    def diff(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """The merge code's ``lora_diff`` applied to x (before strength, unless the merge code puts it inside)."""
        raise NotImplementedError

    # scale of diff in the plain (non-DoRA) merge: weight += strength * plain_scale * diff
    plain_scale = 1.0

    def contribution(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        return self.diff(x, y) * (self.strength * self.plain_scale)

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
        self.up, self.down = _t(v[0], device).flatten(1), _t(v[1], device).flatten(1)
        self.plain_scale = _alpha_over(v[2], self.down.shape[0])

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with diff = up·down."""
        return self.up, self.down

    def low_rank(self):
        return self.up, self.down * (self.strength * self.plain_scale)

    def diff(self, x, y):
        return F.linear(F.linear(x, self.down), self.up)


class _LoHaFactors(Form):
    """The four LoHa factors and the merge code's scale, alpha / the rank of w1."""

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        w1a, w1b, alpha, w2a, w2b = adapter.weights[:5]
        self.w1a, self.w1b, self.w2a, self.w2b = (_t(t, device) for t in (w1a, w1b, w2a, w2b))
        self.plain_scale = _alpha_over(alpha, w1b.shape[0])


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

    def add_into(self, x, out_rows, mask=None):
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
        self.w1, self.w2, low, self.plain_scale = _lokr_factors(adapter, device)
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

    def add_into(self, x, out_rows, mask=None):
        """out_rows (viewed (T, out1, out2)) += s·scale·w1 · (X·w2ᵀ), in place; the mask scales X·w2ᵀ."""
        z = self._right(x)
        if mask is not None:
            z.mul_(mask[:, :, None])
        rows = out_rows.unflatten(-1, (self.w1.shape[0], -1))
        w1 = self.w1 * (self.strength * self.plain_scale)
        rows.baddbmm_(w1.expand(z.shape[0], -1, -1), z)


def _lokr_factors(adapter, device):
    """(w1, w2 or None, (w2_a, w2_b) or None, scale) as the merge code reads a LoKr: a low-rank
    w1 is formed (it is the small factor), w2's pair is kept; scale = alpha / the last pair's rank."""
    w1, w2, alpha, w1a, w1b, w2a, w2b = adapter.weights[:7]
    dim, low = None, None
    if w1 is None:
        dim = w1b.shape[0]
        w1 = _t(w1a, device) @ _t(w1b, device)
    if w2 is None:
        dim = w2b.shape[0]
        low = (_t(w2a, device), _t(w2b, device))
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return _t(w1, device), _t(w2, device), low, scale


class GLoRAForm(Form):
    """GLoRA: ΔW = W'·A·B + C·D, i.e. a LoRA whose up is W'·A (computed once) plus a plain LoRA."""

    needs_weight = True

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        v = adapter.weights
        a1, a2, b1, b2 = (_t(t, device).flatten(1) for t in v[:4])
        old = v[3].shape[1] == v[2].shape[0] == v[0].shape[0] == v[1].shape[1]
        if v[3].shape[0] == v[2].shape[1] == v[0].shape[1] == v[1].shape[0]:
            if not (old and v[1].shape[0] == length and length == in_features):
                old = False
        if old:  # LyCORIS' first layout: ΔW = W·a2·a1 + b2·b1
            self.a, self.b, self.c, self.d, rank = a2, a1, b2, b1, v[0].shape[0]
        else:
            self.a, self.b, self.c, self.d, rank = a1, a2, b1, b2, v[1].shape[0]
        self.plain_scale = _alpha_over(v[4], rank)
        self.wa = None  # W'·A, from prepare()

    def prepare(self, columns):
        wa = torch.zeros(self.length, self.a.shape[1], device=self.device)
        for c0, c1, w_cols in columns():
            wa.addmm_(w_cols.t(), self.a[c0:c1])
        self.wa, self.a = wa, None

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.wa, self.c], dim=1), torch.cat([self.b, self.d], dim=0)

    def low_rank(self):
        up, down = self.factors()
        return up, down * (self.strength * self.plain_scale)

    def diff(self, x, y):
        return F.linear(F.linear(x, self.b), self.wa) + F.linear(F.linear(x, self.d), self.c)


class OFTForm(Form):
    """OFT: W += s·(R − I)ᵀ·W per block of output rows, so out − bias gets the same block map."""

    reads_output = True

    def __init__(self, adapter, strength, start, length, in_features, device):
        super().__init__(adapter, strength, start, length, in_features, device)
        blocks, _, alpha = adapter.weights[:3]
        self.r = _cayley(_t(blocks, device), 0 if alpha is None else alpha)
        self.eye = torch.eye(self.r.shape[-1], device=device)

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
        r = _cayley(_t(blocks, device), alpha)
        if self.strength != 1:  # the merge code interpolates every stage
            r = r * self.strength + (1 - self.strength) * torch.eye(r.shape[-1], device=device)
        self.group = 2 ** (r.shape[0] - 1) * r.shape[-1]
        self.rescale = None if rescale is None else _t(rescale, device).flatten()
        self.r = self.blocks = None
        if self.group <= self.max_group and length % self.group == 0:
            units = torch.eye(self.group, device=device).repeat(length // self.group, 1)
            composite = _butterfly(r, units, self.rescale).unflatten(0, (-1, self.group))  # (groups, G, G)
            # transposed once here: _per_block maps y_j to Σ_j y_j m[j, i]
            self.blocks = (composite - torch.eye(self.group, device=device)).transpose(1, 2).contiguous()
            self.rescale = None
        else:
            self.r = r

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
        self.dora_scale = _t(v[DORA_INDEX[adapter.name]], device).flatten()
        self.alpha = inner.plain_scale if not isinstance(inner, (OFTForm, BOFTForm)) else (v[2] or 0)
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
        if isinstance(self.inner, (LoRAForm, GLoRAForm)):  # low-rank inner: fold the row scale into its up
            up, self.down = self.inner.factors()
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
    if dora_scale.shape[0] != out_rows or base is DenseLoHaForm:
        return None  # DoRA on the input axis: no factored form
    return DoRAForm


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
                      earlier: Sequence[Form], rows: Tuple[int, int], chunk: int = 1024) -> Columns:
    """Column chunks of W' (the weight patched by ``earlier``) on ``rows``: (c0, c1, (cols, length)).

    ``weight32(c0, c1)`` gives W[:, c0:c1] in fp32. Each earlier form is applied to the unit
    inputs e_c0 … e_c1 exactly as in a forward, so any mix of adapter types composes.
    """
    def gen():
        for c0 in range(0, in_features, chunk):
            c1 = min(in_features, c0 + chunk)
            y = weight32(c0, c1).t()  # (cols, out): the output for each unit input
            if earlier:  # a copy: earlier forms add into it, and it may be a view of the weight itself
                y = y.clone(memory_format=torch.contiguous_format)
                eye = torch.zeros(c1 - c0, in_features, device=y.device)
                eye[:, c0:c1] = torch.eye(c1 - c0, device=y.device)
                for form in earlier:
                    view = y[:, form.start:form.start + form.length]
                    view += form.contribution(eye, view)
            yield c0, c1, y[:, rows[0]:rows[0] + rows[1]]
    return gen


class ConvForm:
    """An adapter on output channels ``[start, start + length)`` of a Conv1d/2d/3d."""

    def __init__(self, adapter: Any, strength: float, start: int, length: int, module: torch.nn.Module, device):
        self.strength, self.start, self.length, self.device = float(strength), start, length, device
        dims = len(module.weight.shape) - 2
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        self.kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)

    cast = Form.cast
    tensors = Form.tensors


class ConvLoRAForm(ConvForm):
    """LoCon: ΔW = (α/r)·up·down (optionally down → Tucker mid): conv by down (and mid), then 1x1 up."""

    def __init__(self, adapter, strength, start, length, module, device):
        super().__init__(adapter, strength, start, length, module, device)
        up, down, alpha, mid = adapter.weights[:4]
        self.up, self.down, self.mid = _t(up, device), _t(down, device), _t(mid, device)
        self.scale = self.strength * _alpha_over(alpha, down.shape[0])

    @staticmethod
    def fits(adapter, module) -> bool:
        up, down, _, mid, _, reshape = adapter.weights[:6]
        ones = all(k == 1 for k in up.shape[2:])
        if mid is not None:
            ones = ones and all(k == 1 for k in down.shape[2:]) and mid.shape[2:] == module.weight.shape[2:]
        else:
            ones = ones and down.shape[2:] == module.weight.shape[2:]
        return reshape is None and up.dim() == len(module.weight.shape) and ones

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        if self.mid is None:
            z = self.conv(x, self.down, **self.kw)
        else:
            z = self.conv(self.conv(x, self.down), self.mid, **self.kw)
        return self.conv(z, self.up * self.scale)


class ConvLoKrForm(ConvForm):
    """Conv LoKr: kron(w1, w2) * x = w1 across the in1 input groups of (w2 * each group)."""

    def __init__(self, adapter, strength, start, length, module, device):
        super().__init__(adapter, strength, start, length, module, device)
        w1, w2, low, scale = _lokr_factors(adapter, device)
        self.w1 = w1.flatten(1)
        self.w2 = w2 if low is None else low[0] @ low[1]
        if self.w2.dim() != len(module.weight.shape):
            self.w2 = self.w2.reshape(*self.w2.shape[:2], *module.weight.shape[2:])
        self.scale = self.strength * scale

    @staticmethod
    def fits(adapter, module, length: int) -> bool:
        w1, w2, _, w1a, w1b, w2a, w2b, t2 = adapter.weights[:8]
        kernel = tuple(module.weight.shape[2:])
        rows1, cols1 = (w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1]))[:2]
        if t2 is not None:
            return False  # the merge code fails on a Tucker LoKr (and leaves the weight): so does the fallback
        if w2 is not None:
            rows2, cols2, k2 = w2.shape[0], w2.shape[1], tuple(w2.shape[2:])
        else:
            rows2, cols2, k2 = w2a.shape[0], w2b.shape[1], ()
        if k2 != kernel and not (k2 == () and all(k == 1 for k in kernel)):
            return False  # the merge code cannot reshape this kron to the weight either
        return rows1 * rows2 == length and cols1 * cols2 == module.weight.shape[1] and (w1 is None or w1.dim() == 2)

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.w1.shape[1]
        z = self.conv(x.reshape(x.shape[0] * groups, -1, *x.shape[2:]), self.w2, **self.kw)
        z = z.reshape(x.shape[0], groups, *z.shape[1:])  # (B, in1, out2, ...)
        return torch.einsum("ij,bj...->bi...", self.w1 * self.scale, z).flatten(1, 2)


def conv_form_class(adapter: Any, module: torch.nn.Module, length: int) -> Optional[type]:
    """The factored form of a plain LoCon or LoKr on a conv (groups 1, zero padding), or None."""
    name, v = getattr(adapter, "name", None), getattr(adapter, "weights", None)
    if getattr(module, "groups", 1) != 1 or getattr(module, "padding_mode", "zeros") != "zeros" \
            or not isinstance(v, (tuple, list)) or name not in ("lora", "lokr"):
        return None
    if v[DORA_INDEX[name]] is not None or len(module.weight.shape) not in (3, 4, 5):
        return None
    if name == "lora":
        return ConvLoRAForm if ConvLoRAForm.fits(adapter, module) else None
    return ConvLoKrForm if ConvLoKrForm.fits(adapter, module, length) else None
