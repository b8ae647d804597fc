"""Linear and embedding layers whose weights stay in a GGUF file's quantized blocks
(`quantization="gguf"`).

The kernels read Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K: 4.5 to 8.5 bits a weight
where float32 takes 32 and int8 8, so the model fits where its dequantized copy would not, and
decoding, which streams every weight once a step, reads fewer bytes. The C++ kernels
(kernels/cpu/ops.cpp) dequantize each block in registers exactly as gguf-py does, so products
differ from the dequantized float32 model's only in summation order.

A fused layer (q/k/v, gate/up) is filled from several checkpoint tensors, which one file may
quantize differently (a Q4_K_M file mixes types): each output slice is a part of its own, and
parts in a type the kernels do not read (F16, F32, IQ and the 2-3 bit K-quants) are kept
dequantized in float32.

With `q8_activations` (`quantization="gguf_q8"`), activation rows are quantized per 32-value
block to int8 and multiplied with integer dot products, as llama.cpp does: 1.2-1.5x faster than
float32 activations at one row on SmolLM2's shapes, and no longer the float32 model's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lmserve.kernels import cpu_ops
from lmserve.layers.direct_call import DirectCall

# Rows from which dequantizing a part and one float32 GEMM beat the register kernel, by build
# (measured on a 2-core EPYC, float32 rows): the AVX-512 kernel (8 rows a pass, its weight rows
# tiled) wins at every count tried, to 512 rows (SmolLM2's Q4_1 576 x 3072 at 128 rows 2.0 vs
# 2.6 ms, at 512 8.4 vs 9.4 ms; a 2048 x 2048 Q4_0 18.4 vs 23.2 ms); the AVX2 one (4 rows a
# pass) loses from 24-64 rows on, by shape (SmolLM2's from 24-32).
_GEMM_ROWS = {"AVX512": 1 << 62}.get(torch.backends.cpu.get_cpu_capability(), 24)


def kept_quantized(qtype: int) -> bool:
    """Whether tensors of this GGUF type (ggml id) stay in their blocks."""
    return qtype in cpu_ops.GGUF_TYPES


@dataclass(frozen=True)
class GGUFRows:
    """A checkpoint tensor as a GGUF file stores it: each output row's blocks, raw."""

    data: torch.Tensor  # uint8 [rows, bytes per row]
    qtype: int  # ggml type id
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)


@dataclass(frozen=True)
class _Part:
    start: int  # first output column
    size: int
    qtype: int | None  # None: float32 weights [in, size]


class GGUFLinear(DirectCall, nn.Module):
    """Our Linear's interface (in, out, load_rows) over GGUF parts; float32 in and out."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        q8_activations: bool = False,
        requantize: int | None = None,
    ) -> None:
        """`requantize`: float weight rows given to load_rows are stored as blocks of this type
        (quantization="int4"), so the layer's float32 weights are never held whole."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.q8_activations = q8_activations
        self._matmul = cpu_ops.gguf_matmul_q8 if q8_activations else cpu_ops.gguf_matmul
        # q8 rows run through the kernel however many there are, so that a request's numbers
        # do not depend on what else is batched with it; float32 ones switch to a GEMM where
        # that is faster
        self.kernel_rows = 1 << 62 if q8_activations else _GEMM_ROWS
        self._requantize = requantize
        # (part, its weights) in output order; the weights are also this module's buffers
        self._parts: list[tuple[_Part, torch.Tensor]] = []
        self._loading: dict[int, tuple[_Part, torch.Tensor]] = {}

    @classmethod
    def like(cls, linear: nn.Module, q8_activations: bool = False) -> GGUFLinear:
        """An empty twin of our Linear, filled by `load_rows` and then `finish_loading`."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, q8_activations)

    def load_rows(self, name: str, tensor: torch.Tensor | GGUFRows, start: int, size: int) -> None:
        """Output rows start:start+size: `weight` as GGUFRows, or float [size, in] (a type the
        kernels do not read, dequantized); `bias` [size]."""
        if name == "bias":
            assert self.bias is not None
            self.bias.narrow(0, start, size).copy_(tensor)
            return
        if tensor.shape != (size, self.in_features):
            raise ValueError(f"weight rows of shape {tuple(tensor.shape)}, expected {size} rows")
        if self._requantize is not None and not isinstance(tensor, GGUFRows):
            tensor = _quantized_rows(tensor, self._requantize)
        if isinstance(tensor, GGUFRows):
            self._loading[start] = (_Part(start, size, tensor.qtype), tensor.data.contiguous())
        else:
            self._loading[start] = (_Part(start, size, None), tensor.float().t().contiguous())
        if sum(part.size for part, _ in self._loading.values()) == self.out_features:
            self.finish_loading()  # now, so that only one layer's parts are held twice

    def finish_loading(self) -> None:
        """Join neighbouring parts of one type (one kernel call each) and check that the parts
        cover every output row; a layer already finished stays as it is."""
        if self._parts and not self._loading:
            return
        groups: list[tuple[_Part, list[torch.Tensor]]] = []
        end = 0
        for start in sorted(self._loading):
            part, weight = self._loading[start]
            if start != end:
                break
            end = start + part.size
            if groups and groups[-1][0].qtype == part.qtype:
                last, weights = groups[-1]
                groups[-1] = (
                    _Part(last.start, last.size + part.size, part.qtype),
                    [*weights, weight],
                )
            else:
                groups.append((part, [weight]))
        if end != self.out_features:
            raise ValueError(f"checkpoint leaves output rows {end}.. of a linear layer unset")
        self._loading.clear()
        self._parts = []
        for i, (part, weights) in enumerate(groups):
            dim = 0 if part.qtype is not None else 1
            joined = torch.cat(weights, dim) if len(weights) > 1 else weights[0]
            self.register_buffer(f"part{i}", joined)
            self._parts.append((part, joined))

    def block_parts(self) -> list[tuple[int, int, torch.Tensor]] | None:
        """(GGUF type, first output column, blocks) of each part, for callers of the kernels
        (models/decode_layers.py); None where a part is kept in float32."""
        if any(part.qtype is None for part, _ in self._parts):
            return None
        return [(part.qtype, part.start, blocks) for part, blocks in self._parts]  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # lean: ~120 of these run per decode step, where Python is a third of the step's time
        shape = x.shape
        if x.dim() != 2:
            x = x.reshape(-1, self.in_features)
        x = x.contiguous()
        rows = x.shape[0]
        out = torch.empty(rows, self.out_features)
        for part, weight in self._parts:
            if part.qtype is not None and rows < self.kernel_rows:
                self._matmul(x, weight, part.qtype, out, part.start)
            elif part.qtype is not None:
                dense = cpu_ops.gguf_dequantize(weight, part.qtype, self.in_features)
                out[:, part.start : part.start + part.size] = F.linear(x, dense)
            else:
                out[:, part.start : part.start + part.size] = x @ weight
        if self.bias is not None:
            out.add_(self.bias)
        return out if len(shape) == 2 else out.view(*shape[:-1], self.out_features)


class GGUFEmbedding(DirectCall, nn.Module):
    """A token embedding table as the file stores it: the rows a batch looks up are dequantized
    then, exactly as gguf-py does. A tied LM head shares the same blocks (a 262k-token Gemma
    table is 178 MB in Q8_0, 671 MB in float32). A type the kernels do not read is kept in
    float32."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.register_buffer("table", None)
        self.qtype: int | None = None

    def load_rows(self, name: str, tensor: torch.Tensor | GGUFRows, start: int, size: int) -> None:
        """The whole table: GGUFRows, or float [num_embeddings, embedding_dim]."""
        if name != "weight" or (start, size) != (0, self.num_embeddings):
            raise ValueError(f"an embedding table loads whole, not rows {start}..{start + size}")
        if tuple(tensor.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding table of shape {tuple(tensor.shape)}")
        if isinstance(tensor, GGUFRows):
            self.table, self.qtype = tensor.data.contiguous(), tensor.qtype
        else:
            self.table, self.qtype = tensor.float().contiguous(), None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qtype is None:
            return F.embedding(ids, self.table)
        rows = self.table.index_select(0, ids.reshape(-1))
        dense = cpu_ops.gguf_dequantize(rows, self.qtype, self.embedding_dim)
        return dense.view(*ids.shape, self.embedding_dim)


def replace_embeddings(model: nn.Module) -> None:
    """Swap every nn.Embedding in `model` for an empty GGUFEmbedding, before loading."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Embedding):
            model.set_submodule(name, GGUFEmbedding(module.num_embeddings, module.embedding_dim))


def replace_linears(
    model: nn.Module, linear_type: type[nn.Module], q8_activations: bool = False
) -> list[GGUFLinear]:
    """Swap every `linear_type` layer in `model` for an empty GGUFLinear (before loading, so
    the float32 weights are never filled); returns the new layers."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, linear_type)]
    layers = []
    for name, module in targets:
        layer = GGUFLinear.like(module, q8_activations)
        model.set_submodule(name, layer)
        layers.append(layer)
    return layers


# quantization="int4": GGUF's Q4_1 (groups of 32 weights with a scale and a minimum: 5 bits a
# weight), and Q8_0 for the LM head, whose rounding every token's logits see (llama.cpp's 4-bit
# mixes keep their output layer wider too)
_INT4, _INT4_HEAD = 3, 8


def replace_linears_int4(model: nn.Module, linear_type: type[nn.Module]) -> list[GGUFLinear]:
    """Swap every `linear_type` layer in `model` whose input is a multiple of 32 wide for an
    empty GGUFLinear that stores the float rows it is loaded with as Q4_1 blocks (the LM head's
    as Q8_0), before loading: the float32 weights are never held whole (a narrower layer stays
    float). Returns the new layers."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, linear_type)]
    layers = []
    for name, module in targets:
        if module.in_features % 32:
            continue
        qtype = _INT4_HEAD if name == "lm_head" else _INT4
        layer = GGUFLinear(
            module.in_features, module.out_features, module.bias is not None, requantize=qtype
        )
        model.set_submodule(name, layer)
        layers.append(layer)
    return layers


def quantize_linears_int4(model: nn.Module, linear_type: type[nn.Module]) -> int:
    """Re-store every loaded `linear_type` layer as replace_linears_int4's blocks (random
    weights, drawn in float32 first), one layer at a time. Returns how many were replaced."""
    loaded = [(n, m) for n, m in model.named_modules() if isinstance(m, linear_type)]
    layers = replace_linears_int4(model, linear_type)
    for name, module in loaded:
        layer = model.get_submodule(name)
        if isinstance(layer, GGUFLinear):
            if module.bias is not None:
                layer.load_rows("bias", module.bias.detach(), 0, module.out_features)
            weight = module.weight.detach().t()  # our Linear keeps [in, out]
            layer.load_rows("weight", weight, 0, module.out_features)
    return len(layers)


def _quantized_rows(rows: torch.Tensor, qtype: int, chunk: int = 4096) -> GGUFRows:
    """Float weight rows [out, in] as gguf-py quantizes them to `qtype` blocks, `chunk` rows
    at a time (its temporaries are several copies of what it is given: a 262k-token head's
    would be gigabytes)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    kind = GGMLQuantizationType(qtype)
    parts = [
        torch.from_numpy(quantize(rows[i : i + chunk].detach().float().contiguous().numpy(), kind))
        for i in range(0, rows.shape[0], chunk)
    ]
    return GGUFRows(torch.cat(parts) if len(parts) > 1 else parts[0], qtype, rows.shape[1])
