"""Channel graphs by tracing: `traced_topology(model)` follows any network torch.fx can trace.

How. torch.fx records the forward as a graph of operations; an interpreter runs it on one
example input (layers with weights on the meta device: shapes, no memory; the rest on small
CPU zeros) and carries, beside every activation, a tensor of the same shape that holds for
each element the global id of the channel it belongs to (-1: a constant, such as zero
padding). Operations that only move data (view, reshape, flatten, transpose, permute,
slicing, cat, stack, pad, chunk, split, pixel and channel shuffles, unfold into patches) are
run on these id tensors as they are, so every placement of every channel is followed exactly,
whatever the reshaping. The rules for the rest:

- Weights. A conv (1-, 2- or 3-d, grouped, depthwise) or linear layer (module or functional
  with a parameter) makes a node set named after it, with one weight link from the node set
  of its input channels. A linear layer after a flatten reads each channel as `fold`
  consecutive features. When its input is not one whole node set in order (a
  concatenation, a slice, a zero-padded tensor), the input gets its own node set
  (`<layer>.in`) fed by pass-through links at the right offsets.
- Channel-wise operations keep channels: elementwise functions (activations, dropout,
  arithmetic with a number), normalisations (BatchNorm, LayerNorm, GroupNorm, softmax: their
  statistics are not edges), pooling and resampling over positions, reductions over other
  axes. A norm's parameters and a layer's bias are recorded as following its channels.
- Mixing. An operation whose elements depend on several channels (the sum or product of two
  activations, a reduction over channels, the matrix product of two activations) makes a
  node set with one channel per distinct set of channels its elements depend on, in order of
  first appearance, and weightless links into it: pass-throughs where each of its channels
  takes one channel of an input (residual adds, option-A shortcuts with their zero padding,
  gating), mixes (all to all, per group) where it takes several.
- Attention (q @ k^T, softmax, @ v; written out or with scaled_dot_product_attention). A
  head's scores depend on all the head's query and key channels, so q @ k^T makes one node
  per head, with mix links from the head's q and k channels; scores @ v makes a node set
  whose channel j of head h takes channel j of the head's values (a pass-through) and the
  head's score (a mix). The projections are linear layers (weight links), LayerNorm keeps
  channels and the residual adds are pass-throughs, so a transformer block reads: input ->
  q, k, v -> scores (one node per head) -> attention output -> output projection ->
  residual add -> MLP hidden units -> MLP output -> residual add.
- Merging. A layer whose output is used only once, as it is, in a sum or product (a ResNet
  block's last conv, the value projection of attention, a gate) writes straight into the
  result's channels: its node set is merged into the result's, as in the paper's graphs.
- Permutation. Node sets whose channel order an operation depends on (a softmax or
  normalisation over part of them, a GroupNorm, elementwise arithmetic with a constant
  tensor) are listed as `fixed`.

Anything else (a Python branch or loop on a tensor value, an operation or layer type not
listed: ConvTranspose, Embedding, nn.MultiheadAttention, RNNs, einsum) raises TicketctlError
naming it; the omp and random scores need no channel graph."""

from __future__ import annotations

import inspect
import operator
import traceback
from collections.abc import Iterable
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ticketctl.errors import TicketctlError
from ticketctl.models.topology import Link, Topology

HINT = "the omp and random scores need no channel graph"
SIZES = (8, 16, 32, 28, 64, 96, 128, 224)  # example input sides tried, the cheapest first
TOKENS = 4  # example sequence length for networks that start with a linear layer

POINTWISE = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "leaky_relu", "elu", "selu",
    "celu", "hardswish", "hardsigmoid", "mish", "softplus", "softsign", "tanhshrink",
    "threshold", "logsigmoid", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "neg", "pos", "abs", "exp", "log", "log1p",
    "log2", "sqrt", "rsqrt", "square", "pow", "clamp", "clamp_min", "clamp_max", "clip", "sin",
    "cos", "erf", "sign", "reciprocal", "add", "sub", "mul", "truediv", "div", "floordiv",
    "maximum", "minimum", "where", "masked_fill", "lerp", "addcmul", "addcdiv", "eq", "ne",
    "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "nan_to_num",
}
SAME_AS_FIRST = {  # the first argument's channels; others only give a dtype, device or shape
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type",
    "type_as", "cpu", "cuda", "requires_grad",
}
NORMALISE = {"softmax": -1, "log_softmax": -1, "softmin": -1, "normalize": 1,
             "layer_norm": -1, "rms_norm": -1}  # function -> default axis
ORDERED_NORMS = {"group_norm", "local_response_norm"}
NOT_ACTIVATIONS = {
    "getattr", "size", "dim", "numel", "ndimension", "nelement", "is_contiguous", "argmax",
    "argmin", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor",
}
MOVES = {
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "t", "squeeze",
    "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "broadcast_to", "repeat",
    "tile", "chunk", "split", "split_with_sizes", "tensor_split", "unbind", "narrow", "select",
    "movedim", "moveaxis", "swapaxes", "swapdims", "flip", "roll", "getitem", "cat", "concat",
    "concatenate", "stack", "pad", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle", "unfold",
}
REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "prod", "std", "var", "logsumexp",
              "nansum", "nanmean"}
SPATIAL = {
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
    "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices", "lp_pool1d",
    "lp_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
}
CONVS = {"conv1d": 1, "conv2d": 1, "conv3d": 1, "linear": -1}  # function -> channel axis

KEEP_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
)
MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
LAYER_NORMS = (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
NORM_MODULES = (*BATCH_NORMS, *LAYER_NORMS, nn.GroupNorm, nn.LocalResponseNorm)
NORM_FUNCTIONS = {"batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"}
PAD_MODES = {"ZeroPad": "constant", "ConstantPad": "constant", "ReflectionPad": "reflect",
             "ReplicationPad": "replicate", "CircularPad": "circular"}


def traced_topology(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Topology:
    """The channel graph of `model` by tracing (rules in the module docstring).

    `input_shape` (batch first) is the example input; without it the shape is found from the
    first layer: its channels, and the first of a few sides (8 to 224) or, for a network that
    starts with a linear layer, a short sequence, on which the forward runs."""
    name = type(model).__name__
    gm = fx.GraphModule(model, _trace(model))
    shapes = [tuple(input_shape)] if input_shape is not None else _example_shapes(gm, name)
    problem = None
    for shape in shapes:
        example = torch.empty(shape, device="meta")
        try:
            _Channels(gm, name, track=False).execute(example)
        except Exception as e:  # the forward does not run on this shape: try the next
            problem = _first_line(e)
            continue
        return _Channels(gm, name).topology(example)
    raise TicketctlError(f"cannot run {name} on any example input "
                         f"({', '.join(map(str, shapes))}): {problem}; {HINT}")


# ---- tracing -------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with errors that name what cannot be followed and where."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def to_bool(self, obj: fx.Proxy) -> bool:
        raise TicketctlError(f"cannot trace {self.name}: Python control flow on a tensor value "
                             f"(the result of `{_op_name(obj.node)}`){_where()}; {HINT}")

    def iter(self, obj: fx.Proxy) -> Iterable:
        raise TicketctlError(f"cannot trace {self.name}: a Python loop over a tensor value "
                             f"(`{_op_name(obj.node)}`){_where()}; {HINT}")

    def keys(self, obj: fx.Proxy) -> Any:
        raise TicketctlError(f"cannot trace {self.name}: `**` on a tensor value "
                             f"(`{_op_name(obj.node)}`){_where()}; {HINT}")


def _trace(model: nn.Module) -> fx.Graph:
    name = type(model).__name__
    params = list(inspect.signature(model.forward).parameters.values())
    # arguments after the first with defaults (an optional mask) keep their defaults
    concrete = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
    try:
        graph = _Tracer(name).trace(model, concrete_args=concrete or None)
    except TicketctlError:
        raise
    except Exception as e:
        raise TicketctlError(f"cannot trace {name}: {_first_line(e)}{_where(e)}; {HINT}") from e
    inputs = [n for n in graph.nodes if n.op == "placeholder" and not n.args]
    if len(inputs) != 1:
        raise TicketctlError(f"cannot trace {name}: its forward takes {len(inputs)} tensors "
                             f"without defaults; only networks of one input are traced; {HINT}")
    return graph


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _where(e: BaseException | None = None) -> str:
    """' at file:line: `source`', for the innermost frame of the model's own code."""
    stack = traceback.extract_tb(e.__traceback__) if e is not None else traceback.extract_stack()
    torch_dir = str(Path(torch.__file__).parent)
    for frame in reversed(stack):
        if frame.filename.startswith(torch_dir) or frame.filename == __file__:
            continue
        code = (frame.line or "").strip()
        return f" at {Path(frame.filename).name}:{frame.lineno}" + (f": `{code}`" if code else "")
    return ""


def _op_name(node: fx.Node) -> str:
    """The operation's plain name: `add` for +, x.add(y), torch.add and x += y."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
    else:
        return str(node.target)
    name = name.strip("_")
    if node.op == "call_function" and node.target in (operator.iadd, operator.isub,
                                                      operator.imul, operator.itruediv):
        name = name[1:]
    return {"and": "logical_and", "or": "logical_or", "invert": "logical_not"}.get(name, name)


def _example_shapes(gm: fx.GraphModule, name: str) -> list[tuple[int, ...]]:
    """Example inputs from the first layer the forward calls."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, CONV_MODULES):
            return [(1, m.in_channels) + (s,) * (m.weight.dim() - 2) for s in SIZES]
        if isinstance(m, BATCH_NORMS) and isinstance(m, nn.BatchNorm1d):
            return [(1, m.num_features), (1, m.num_features, TOKENS)]
        if isinstance(m, BATCH_NORMS):
            dims = 3 if isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d)) else 2
            return [(1, m.num_features) + (s,) * dims for s in SIZES]
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            f = m.in_features if isinstance(m, nn.Linear) else int(m.normalized_shape[-1])
            images = [(1, c, s, s) for c in (1, 3) for s in range(1, 513) if c * s * s == f]
            return [(1, TOKENS, f), (1, f)] + images
        raise TicketctlError(f"cannot trace {name}: its first layer "
                             f"{node.target} ({type(m).__name__}) is not one whose input "
                             f"channels can be followed; {HINT}")
    raise TicketctlError(f"cannot trace {name}: it has no layer with weights; {HINT}")


# ---- following channels --------------------------------------------------------------------


class _Channels(fx.Interpreter):
    """Runs the traced forward on the meta device, carrying channel ids beside activations."""

    def __init__(self, gm: fx.GraphModule, name: str, track: bool = True) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.name = name
        self.track = track
        self.ids: dict[fx.Node, Any] = {}
        self.params = dict(gm.named_parameters(remove_duplicate=False))
        self.sizes: dict[str, int] = {}
        self.base: dict[str, int] = {}
        self.n = 0
        self.links: list[Link] = []
        self.follow: dict[str, list[str]] = {}
        self.fixed: set[str] = set()
        self.result: Any = None
        self.meta = all(t.is_meta for t in chain(gm.parameters(), gm.buffers()))

    # -- running: layers with weights on the meta device (no memory, whatever their size),
    # the rest on zeros of the example's size on the CPU, where it costs microseconds (on
    # meta, elementwise operations import torch._dynamo, a second the first time)
    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        mod = self.fetch_attr(target)
        if isinstance(mod, NORM_MODULES) and args and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])  # the shape of its input
        state = dict(chain(mod.named_parameters(), mod.named_buffers()))
        if not state:
            return _stand_in(mod, args, kwargs)
        if isinstance(mod, (nn.Linear, *CONV_MODULES)) and len(args) == 1 and not kwargs:
            weight = mod.weight.to("meta")  # without the bias: the same shape, no addmm
            return F.linear(args[0], weight) if isinstance(mod, nn.Linear) else \
                mod._conv_forward(args[0], weight, None)
        if self.meta:
            return mod(*args, **kwargs)
        meta = {k: v.to("meta") for k, v in state.items()}
        return torch.func.functional_call(mod, meta, args, kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if getattr(target, "__name__", "") in NORM_FUNCTIONS and args and \
                isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])
        return _stand_in(target, args, kwargs)

    def call_method(self, target: str, args: tuple, kwargs: dict) -> Any:
        return _stand_in(lambda obj, *a, **k: getattr(obj, target)(*a, **k), args, kwargs)

    def get_attr(self, target: str, args: tuple, kwargs: dict) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.track:
            try:
                self.ids[n] = self._track(n, out)
            except TicketctlError:
                raise
            except Exception as e:  # an operation whose channels cannot be followed
                raise self._unmapped(n, _first_line(e)) from e
        return out

    def execute(self, example: torch.Tensor) -> None:
        """Interpreter.run without its error logging (which imports torch._inductor)."""
        self.env, self.args_iter = {}, iter([example])
        for node in self.graph.nodes:
            self.env[node] = self.run_node(node)

    def topology(self, example: torch.Tensor) -> Topology:
        self.execute(example)
        sink = self._sink()
        _merge_into_sums(self.sizes, self.links, self.follow, keep={"input", sink})
        if sink != "output" and "output" not in self.sizes:
            rename = {sink: "output"}
            self.sizes = {rename.get(k, k): v for k, v in self.sizes.items()}
            self.links = [replace(lk, src=rename.get(lk.src, lk.src),
                                  dst=rename.get(lk.dst, lk.dst)) for lk in self.links]
            self.follow = {rename.get(k, k): v for k, v in self.follow.items()}
            self.fixed = {rename.get(k, k) for k in self.fixed}
            sink = "output"
        return Topology(self.sizes, self.links, "input", sink,
                        {k: v for k, v in self.follow.items() if k in self.sizes and v},
                        self.fixed & set(self.sizes))

    # -- node sets and links
    def _new_set(self, name: str, size: int) -> str:
        unique, i = name, 0
        while unique in self.sizes:
            i += 1
            unique = f"{name}.{i}"
        self.sizes[unique] = size
        self.base[unique] = self.n
        self.n += size
        return unique

    def _set_of(self, ids: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """For global channel ids, the node sets in creation order and each id's set index."""
        names = list(self.base)
        starts = torch.tensor([self.base[k] for k in names])
        return names, torch.searchsorted(starts, ids, right=True) - 1

    def _sets_in(self, ids: Any) -> set[str]:
        found: set[str] = set()
        for t in _tensors(ids):
            u = torch.unique(t)
            u = u[u >= 0]
            if len(u):
                names, idx = self._set_of(u)
                found |= {names[i] for i in torch.unique(idx).tolist()}
        return found

    def _links_into(self, dst: str, local: torch.Tensor, glob: torch.Tensor) -> None:
        """Weightless links making channel local[e] of `dst` take global channel glob[e]."""
        if not len(glob):
            return
        names, which = self._set_of(glob)
        for s in torch.unique(which).tolist():
            src = names[s]
            sel = which == s
            c, m = glob[sel] - self.base[src], local[sel]
            self.links += _weightless(src, dst, c, m, self.sizes[src], self.sizes[dst])

    def _materialise(self, keys: torch.Tensor, table: list[frozenset[int]] | None,
                     name: str) -> torch.Tensor:
        """Channel ids for elements that depend on the channel sets table[keys] (keys are
        channel ids themselves when `table` is None): unchanged when each element depends
        on at most one channel, else a new node set with a channel per distinct set."""
        if table is None:
            return keys
        flat = keys.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)
        first = torch.full((len(uniq),), flat.numel()).scatter_reduce(
            0, inv, torch.arange(flat.numel()), "amin")
        order = torch.argsort(first).tolist()
        sets = [table[u] if u >= 0 else frozenset() for u in uniq.tolist()]
        if all(len(s) <= 1 for s in sets):
            lut = torch.tensor([next(iter(s)) if s else -1 for s in sets], dtype=torch.long)
            return lut[inv].reshape(keys.shape)
        index: dict[frozenset[int], int] = {}
        for i in order:
            if sets[i] and sets[i] not in index:
                index[sets[i]] = len(index)
        dst = self._new_set(name, len(index))
        local = torch.tensor([m for s, m in index.items() for _ in s], dtype=torch.long)
        glob = torch.tensor([c for s in index for c in sorted(s)], dtype=torch.long)
        self._links_into(dst, local, glob)
        lut = torch.tensor([self.base[dst] + index[s] if s else -1 for s in sets],
                           dtype=torch.long)
        return lut[inv].reshape(keys.shape)

    def _channel_vector(self, ids: torch.Tensor, axis: int
                        ) -> tuple[torch.Tensor, list[frozenset[int]] | None]:
        """Per position along `axis`, the channel it holds (-1: none), or, where positions
        hold several, keys into a table of channel sets."""
        rows = ids.movedim(axis, 0).reshape(ids.shape[axis], -1)
        return _row_sets(rows)

    def _input_set(self, ids: torch.Tensor, axis: int, name: str) -> tuple[str, int]:
        """The node set a layer reads along `axis`, and how many features each channel owns."""
        keys, table = self._channel_vector(ids, axis)
        if table is not None:  # positions that hold several channels: one channel each
            dst = self._new_set(name, len(keys))
            local = torch.tensor([p for p, k in enumerate(keys.tolist()) for _ in table[k]],
                                 dtype=torch.long)
            glob = torch.tensor([c for k in keys.tolist() for c in sorted(table[k])],
                                dtype=torch.long)
            self._links_into(dst, local, glob)
            return dst, 1
        v, fold = keys, 1
        if len(v) and bool((v >= 0).all()):
            change = torch.nonzero(v != v[0])
            run = int(change[0]) if len(change) else len(v)
            blocks = v.view(-1, run) if len(v) % run == 0 else None
            if run > 1 and blocks is not None and bool((blocks == blocks[:, :1]).all()):
                fold = run
        u = v[::fold]
        src = self._whole(u)
        if src is not None:
            return src, fold
        dst = self._new_set(name, len(u))
        keep = u >= 0
        self._links_into(dst, torch.arange(len(u))[keep], u[keep])
        return dst, fold

    def _whole_set(self, ids: torch.Tensor, axis: int) -> str | None | bool:
        """The node set laid out in order along `axis`; False when the ids do not vary along
        it (the operation is per channel); None when it is anything else."""
        if bool((ids == ids.narrow(axis, 0, 1)).all()):
            return False
        keys, table = self._channel_vector(ids, axis)
        return None if table is not None else self._whole(keys)

    def _whole(self, channels: torch.Tensor) -> str | None:
        """The node set whose channels these are, all of them in order, else None."""
        if not len(channels) or int(channels[0]) < 0:
            return None
        names, idx = self._set_of(channels[:1])
        src = names[int(idx[0])]
        whole = len(channels) == self.sizes[src] and torch.equal(
            channels, self.base[src] + torch.arange(len(channels)))
        return src if whole else None

    def _per_channel(self, ids: torch.Tensor, axis: int, tensors: list[str]) -> None:
        """An operation over `axis` that treats channels alike (a norm, a softmax): its
        per-channel tensors follow the channels; over part of a node set it fixes the order."""
        if ids.dim() == 0:
            return
        found = self._whole_set(ids, axis % ids.dim())
        if found is False:
            return
        if found is None:
            self.fixed |= self._sets_in(ids)
        elif tensors:
            self.follow.setdefault(found, []).extend(tensors)

    # -- the rules
    def _track(self, n: fx.Node, out: Any) -> Any:
        if n.op == "placeholder":
            return self._placeholder(n, out)
        if n.op == "get_attr":
            return None
        if n.op == "output":
            self.result = self._ids(n.args[0])
            return None
        if not any(self.ids.get(a) is not None for a in n.all_input_nodes):
            return None  # computed from constants only
        if n.op == "call_module":
            return self._module(n, self.fetch_attr(n.target), out)
        return self._function(n, _op_name(n), out)

    def _ids(self, arg: Any) -> Any:
        return fx.node.map_aggregate(arg, lambda a: self.ids.get(a) if isinstance(a, fx.Node)
                                     else None)

    def _act(self, n: fx.Node, i: int = 0) -> torch.Tensor:
        ids = self.ids.get(n.args[i]) if isinstance(n.args[i], fx.Node) else None
        if not isinstance(ids, torch.Tensor):
            raise self._unmapped(n, "its input is not a tensor whose channels are followed")
        return ids

    def _placeholder(self, n: fx.Node, out: Any) -> Any:
        if n.args or not isinstance(out, torch.Tensor):
            return None  # an argument left at its default
        axis = 1
        if out.dim() == 3:  # (batch, channels, length) for a conv; (batch, tokens, features)
            first = next((u for u in self.module.graph.nodes if u.op == "call_module"), None)
            if first is not None and isinstance(self.fetch_attr(first.target),
                                                (nn.Linear, nn.LayerNorm)):
                axis = 2
        base = self.base[self._new_set("input", out.shape[axis])]
        return _along(base + torch.arange(out.shape[axis]), axis, out.shape)

    def _unmapped(self, n: fx.Node, why: str = "") -> TicketctlError:
        where = _scope(n)
        if n.op == "call_module":
            what = f"layer {n.target} ({type(self.fetch_attr(n.target)).__name__})"
        elif n.op == "call_method":
            what = f"operation `.{n.target}()`" + (f" in {where}" if where else "")
        else:
            what = f"operation `{_op_name(n)}`" + (f" in {where}" if where else "")
        return TicketctlError(f"cannot map the channels of {self.name}: {what} is not "
                              f"supported{': ' + why if why else ''}; {HINT}")

    def _module(self, n: fx.Node, m: nn.Module, out: Any) -> Any:
        target = str(n.target)
        if isinstance(m, CONV_MODULES):
            return self._weight(n, f"{target}.weight", 1, m.groups, out, target,
                                f"{target}.bias" if m.bias is not None else None)
        if isinstance(m, nn.Linear):
            return self._weight(n, f"{target}.weight", -1, 1, out, target,
                                f"{target}.bias" if m.bias is not None else None)
        ids = self._act(n)
        own = [f"{target}.{k}" for k, v in chain(m.named_parameters(recurse=False),
                                                 m.named_buffers(recurse=False)) if v.dim()]
        if isinstance(m, BATCH_NORMS) or (isinstance(m, nn.PReLU) and m.num_parameters > 1):
            self._per_channel(ids, 1, own)
            return ids
        if isinstance(m, LAYER_NORMS):
            shape = tuple(m.normalized_shape)
            if len(shape) == 1:
                self._per_channel(ids, -1, own)
            elif any(self._whole_set(ids, d) is not False  # parameters over channels and more
                     for d in range(ids.dim() - len(shape), ids.dim())):
                self.fixed |= self._sets_in(ids)
            return ids
        if isinstance(m, (nn.GroupNorm, nn.LocalResponseNorm)):
            self.fixed |= self._sets_in(ids)
            return ids
        if isinstance(m, (KEEP_MODULES, nn.PReLU)):
            return ids
        if isinstance(m, SOFTMAX_MODULES):
            self._per_channel(ids, m.dim if m.dim is not None else 1, [])
            return ids
        if isinstance(m, POOL_MODULES):
            return self._spatial(n, ids, out)
        if isinstance(m, MOVE_MODULES):
            return self._checked(n, m(ids), out)
        mode = next((v for k, v in PAD_MODES.items() if type(m).__name__.startswith(k)), None)
        if mode is not None:
            return self._checked(n, _pad(ids, m.padding, mode), out)
        hint = "write attention with nn.Linear projections" if isinstance(
            m, nn.MultiheadAttention) else ""
        raise self._unmapped(n, hint)

    def _function(self, n: fx.Node, name: str, out: Any) -> Any:
        if name == "getattr":  # x.shape is not an activation, x.T and x.mT are
            return getattr(self._act(n), n.args[1]) if isinstance(out, torch.Tensor) else None
        if name in NOT_ACTIVATIONS:
            return None
        if name in CONVS:
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target in self.params):
                raise self._unmapped(n, "its weight must be a parameter, used as it is")
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
            bias = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
            return self._weight(n, w.target, CONVS[name], int(groups), out,
                                w.target.removesuffix(".weight"), bias)
        if name in SAME_AS_FIRST:
            return self._act(n)
        if name in POINTWISE:
            return self._pointwise(n, out)
        if name in NORMALISE or name in ORDERED_NORMS:
            ids = self._act(n)
            if name in ORDERED_NORMS:
                self.fixed |= self._sets_in(ids)
                return ids
            at = 2 if name == "normalize" else 1  # F.normalize(x, p, dim)
            dim = NORMALISE[name] if name in ("layer_norm", "rms_norm") else \
                n.kwargs.get("dim", n.args[at] if len(n.args) > at else NORMALISE[name])
            tensors = [a.target for a in chain(n.args[2:], n.kwargs.values())
                       if isinstance(a, fx.Node) and a.op == "get_attr"]
            self._per_channel(ids, dim, tensors)
            return ids
        if name in ("batch_norm", "instance_norm"):
            ids = self._act(n)
            tensors = [a.target for a in chain(n.args[1:], n.kwargs.values())
                       if isinstance(a, fx.Node) and a.op == "get_attr"]
            self._per_channel(ids, 1, tensors)
            return ids
        if name in MOVES:
            return self._move(n, name, out)
        if name in SPATIAL:
            return self._spatial(n, self._act(n), out)
        if name in REDUCTIONS:
            return self._reduce(n, out)
        if name in ("matmul", "bmm", "mm"):
            return self._matmul(n, self._operand(n, 0), self._operand(n, 1), out.shape, n)
        if name == "scaled_dot_product_attention":
            q, k, v = (self._operand(n, i) for i in range(3))
            scores_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
            scores = self._matmul(n, q, k.transpose(-2, -1), scores_shape, n, "scores")
            return self._matmul(n, scores, v, out.shape, n)
        raise self._unmapped(n)

    def _operand(self, n: fx.Node, i: int) -> torch.Tensor:
        a = n.args[i] if len(n.args) > i else None
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.target in self.params:
            raise self._unmapped(n, f"it multiplies by the parameter {a.target} directly; use "
                                    "nn.Linear")
        ids = self.ids.get(a) if isinstance(a, fx.Node) else None
        if ids is None:
            return torch.full(tuple(self.env[a].shape), -1, dtype=torch.long)
        return ids

    def _weight(self, n: fx.Node, param: str, axis: int, groups: int, out: torch.Tensor,
                name: str, bias: str | None) -> torch.Tensor:
        ids = self._act(n)
        src, fold = self._input_set(ids, axis % ids.dim(), f"{name}.in")
        width = out.shape[axis]
        weight = self.params[param]
        if weight.shape[0] != width or weight.shape[1] * groups != self.sizes[src] * fold:
            raise self._unmapped(n, f"its weight {param} {tuple(weight.shape)} does not fit "
                                    f"{self.sizes[src]} input channels x {fold}")
        dst = self._new_set(name, width)
        self.links.append(Link(src, dst, param, groups=groups, fold=fold))
        if bias is not None:
            self.follow.setdefault(dst, []).append(bias)
        return _along(self.base[dst] + torch.arange(width), axis % out.dim(), out.shape)

    def _pointwise(self, n: fx.Node, out: Any) -> torch.Tensor:
        """Elementwise: each element depends on the same element of every activation."""
        if not isinstance(out, torch.Tensor):
            raise self._unmapped(n, "it does not return a tensor")
        parts, constant = [], False
        for a in chain(n.args, n.kwargs.values()):
            if not isinstance(a, fx.Node):
                continue
            ids = self.ids.get(a)
            if isinstance(ids, torch.Tensor):
                parts.append(ids.expand(out.shape))
            elif isinstance(self.env.get(a), torch.Tensor) and self.env[a].numel() > 1:
                constant = True  # a per-element constant: a mask, a per-channel scale
        if constant:
            for p in parts:
                self.fixed |= self._sets_in(p)
        keys, table = parts[0], None
        for p in parts[1:]:
            if table is None and torch.equal(keys, p):
                continue
            keys, table = _combine(keys, table, p, None, self.n)
        return self._materialise(keys, table, _name(n))

    def _move(self, n: fx.Node, name: str, out: Any) -> Any:
        """Data movement: the same operation on the id tensors."""
        if name == "getitem" and any(
                isinstance(i, torch.Tensor) or isinstance(self.env.get(i), torch.Tensor)
                for i in _flat(n.args[1]) if isinstance(i, (fx.Node, torch.Tensor))):
            raise self._unmapped(n, "indexing with a tensor")

        def sub(a: Any) -> Any:
            if not isinstance(a, fx.Node):
                return a
            ids = self.ids.get(a)
            if ids is not None:
                return ids
            value = self.env[a]
            return torch.full(tuple(value.shape), -1, dtype=torch.long) if isinstance(
                value, torch.Tensor) else value

        args = fx.node.map_aggregate(n.args, sub)
        kwargs = dict(fx.node.map_aggregate(n.kwargs, sub))
        if name == "pad":
            mode = kwargs.pop("mode", args[2] if len(args) > 2 else "constant")
            return self._checked(n, _pad(args[0], args[1], mode), out)
        if name == "unfold" and n.op == "call_function":  # patches: floats only, zero padding
            return self._checked(n, _as_floats(lambda x: n.target(x, *args[1:], **kwargs),
                                               args[0]), out)
        if n.op == "call_method":
            result = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            result = n.target(*args, **kwargs)
        return self._checked(n, result, out)

    def _checked(self, n: fx.Node, ids: Any, out: Any) -> Any:
        for a, b in zip(_tensors(ids), _tensors(out), strict=False):
            if tuple(a.shape) != tuple(b.shape):
                raise self._unmapped(n, "its result on channel ids has another shape")
        return ids

    def _spatial(self, n: fx.Node, ids: torch.Tensor, out: Any) -> Any:
        """Pooling and resampling: over the positions of each channel."""
        shape = (out[0] if isinstance(out, tuple) else out).shape
        if ids.dim() < 3 or tuple(shape[:2]) != tuple(ids.shape[:2]):
            raise self._unmapped(n, "it changes the batch or channel axis")
        keys, table = _reduce_dims(ids, list(range(2, ids.dim())))
        if table is not None:
            raise self._unmapped(n, "its windows hold several channels")
        result = keys.reshape(keys.shape[:2] + (1,) * (len(shape) - 2)).expand(shape)
        return (result, None) if isinstance(out, tuple) else result

    def _reduce(self, n: fx.Node, out: Any) -> Any:
        ids = self._act(n)
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        if isinstance(dim, fx.Node) or isinstance(self.ids.get(dim), torch.Tensor):
            return self._pointwise(n, out)  # torch.max(a, b): elementwise
        dims = list(range(ids.dim())) if dim is None else \
            [d % ids.dim() for d in ((dim,) if isinstance(dim, int) else dim)]
        keys, table = _reduce_dims(ids, dims)
        result = self._materialise(keys, table, _name(n))
        shape = (out[0] if isinstance(out, tuple) else out).shape
        result = result.reshape(shape)
        return (result, None) if isinstance(out, tuple) else result

    def _matmul(self, n: fx.Node, a: torch.Tensor, b: torch.Tensor, shape: tuple,
                node: fx.Node, suffix: str = "") -> torch.Tensor:
        """The product of two activations: element (t, j) depends on row t of a and column j
        of b, whatever the weights of the sum."""
        if a.dim() < 2 or b.dim() < 2:
            raise self._unmapped(n, "products of vectors are not followed")
        ka, ta = _reduce_dims(a, [a.dim() - 1])
        kb, tb = _reduce_dims(b, [b.dim() - 2])
        ka, kb = torch.broadcast_tensors(ka, kb)  # [..., t, 1] and [..., 1, j]
        keys, table = _combine(ka, ta, kb, tb, self.n)
        name = _name(node) + (f".{suffix}" if suffix else "")
        return self._materialise(keys, table, name).reshape(shape)

    def _sink(self) -> str:
        out = self.result
        if not isinstance(out, torch.Tensor):
            what = "several values" if isinstance(out, (dict, tuple, list)) else "no tensor"
            raise TicketctlError(f"cannot map the channels of {self.name}: its forward returns "
                                 f"{what}, not one tensor; {HINT}")
        flat = out.reshape(-1)
        flat = flat[flat >= 0]
        if not len(flat):
            raise TicketctlError(f"cannot map the channels of {self.name}: its output does "
                                 f"not depend on its input; {HINT}")
        uniq, inv = torch.unique(flat, return_inverse=True)
        first = torch.full((len(uniq),), len(flat)).scatter_reduce(
            0, inv, torch.arange(len(flat)), "amin")
        channels = uniq[torch.argsort(first)]
        src = self._whole(channels)
        if src is not None:
            return src
        dst = self._new_set("output", len(channels))
        self._links_into(dst, torch.arange(len(channels)), channels)
        return dst


# ---- helpers on id tensors -----------------------------------------------------------------


def _stand_in(fn: Any, args: tuple, kwargs: dict) -> Any:
    """fn on CPU zeros shaped like the meta tensors given; its tensors back on meta."""
    def cpu(a: Any) -> Any:
        return torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) and \
            a.is_meta else a

    def meta(a: Any) -> Any:
        return torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(
            a, torch.Tensor) else a

    out = fn(*fx.node.map_aggregate(args, cpu), **fx.node.map_aggregate(kwargs, cpu))
    return fx.node.map_aggregate(out, meta)


def _scope(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return str(last[0] if isinstance(last, tuple) else last)


def _name(n: fx.Node) -> str:
    scope = _scope(n)
    return f"{scope}.{_op_name(n)}" if scope else _op_name(n)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def _flat(x: Any) -> list[Any]:
    return [y for item in x for y in _flat(item)] if isinstance(x, (tuple, list)) else [x]


def _along(channels: torch.Tensor, axis: int, shape: torch.Size) -> torch.Tensor:
    view = [1] * len(shape)
    view[axis] = len(channels)
    return channels.view(view).expand(tuple(shape))


def _pad(ids: torch.Tensor, padding: Any, mode: str) -> torch.Tensor:
    if mode == "constant":
        return F.pad(ids, tuple(padding), value=-1)
    return _as_floats(lambda x: F.pad(x, tuple(padding), mode=mode), ids)


def _as_floats(fn: Any, ids: torch.Tensor) -> torch.Tensor:
    """fn on ids for operations defined on floats only; shifted by one so the zeros fn pads
    with come back as -1, no channel (ids are exact in float64)."""
    return fn((ids + 1).double()).round().long() - 1


def _row_sets(rows: torch.Tensor) -> tuple[torch.Tensor, list[frozenset[int]] | None]:
    """Per row, its one channel (-1 for none), or keys into a table of channel sets when
    some row holds several."""
    if rows.shape[1] == 0:
        return torch.full((rows.shape[0],), -1, dtype=torch.long), None
    hi = rows.max(1).values
    lo = torch.where(rows < 0, torch.iinfo(torch.long).max, rows).min(1).values
    if bool(((hi < 0) | (lo == hi)).all()):
        return torch.where(hi < 0, -1, hi), None
    table: dict[frozenset[int], int] = {}
    keys = []
    for row in rows.tolist():
        s = frozenset(c for c in row if c >= 0)
        keys.append(table.setdefault(s, len(table)))
    return torch.tensor(keys, dtype=torch.long), list(table)


def _reduce_dims(ids: torch.Tensor, dims: list[int]
                 ) -> tuple[torch.Tensor, list[frozenset[int]] | None]:
    """The channels each element depends on after reducing over `dims` (kept, size 1)."""
    keep = [d for d in range(ids.dim()) if d not in dims]
    moved = ids.permute(keep + dims)
    rows = moved.reshape(-1, max(1, int(torch.tensor(moved.shape[len(keep):]).prod())))
    keys, table = _row_sets(rows)
    shape = [1 if d in dims else ids.shape[d] for d in range(ids.dim())]
    return keys.reshape([ids.shape[d] for d in keep] + [1] * len(dims)).permute(
        _inverse(keep + dims)).reshape(shape), table


def _inverse(perm: list[int]) -> list[int]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return out


def _combine(ka: torch.Tensor, ta: list[frozenset[int]] | None, kb: torch.Tensor,
             tb: list[frozenset[int]] | None, channels: int
             ) -> tuple[torch.Tensor, list[frozenset[int]]]:
    """Element by element, the union of two operands' channel sets."""
    def span(t: list | None) -> int:
        return (len(t) if t is not None else channels) + 1

    def members(t: list | None, k: int) -> frozenset[int]:
        if k < 0:
            return frozenset()
        return t[k] if t is not None else frozenset((k,))

    rb = span(tb)
    code = (ka + 1) * rb + (kb + 1)
    uniq, inv = torch.unique(code, return_inverse=True)
    table = [members(ta, u // rb - 1) | members(tb, u % rb - 1) for u in uniq.tolist()]
    return inv.reshape(code.shape), table


def _weightless(src: str, dst: str, c: torch.Tensor, m: torch.Tensor, size_src: int,
                size_dst: int) -> list[Link]:
    """The links that make channel m[e] of `dst` take channel c[e] of `src`: one mix when
    the pairs are all to all within groups, else pass-throughs, one per run of consecutive
    channels at one offset."""
    if int(torch.bincount(m).max()) > 1 or int(torch.bincount(c).max()) > 1:
        k = int((m == m[0]).sum())  # source channels per group
        g = size_src // k if size_src % k == 0 else 0
        if g and size_dst % g == 0 and len(c) == k * size_dst and \
                bool((c // k == m // (size_dst // g)).all()) and \
                len(torch.unique(c * size_dst + m)) == len(c):
            return [Link(src, dst, groups=g, dense=True)]
    offset = m - c
    order = torch.argsort(offset * (size_src + 1) + c)
    c, offset = c[order], offset[order]
    breaks = torch.nonzero((c[1:] != c[:-1] + 1) | (offset[1:] != offset[:-1])).flatten() + 1
    starts = [0, *breaks.tolist()]
    links = []
    for start, end in zip(starts, [*starts[1:], len(c)], strict=True):
        first, count = int(c[start]), end - start
        links.append(Link(src, dst, offset=int(offset[start]), first=first,
                          count=None if first == 0 and count == size_src else count))
    return links


def _merge_into_sums(sizes: dict[str, int], links: list[Link], follow: dict[str, list[str]],
                     keep: set[str]) -> None:
    """A node set made by one weight link whose only use is one pass-through, as it is, into
    a sum: the weights write into the sum directly."""
    changed = True
    while changed:
        changed = False
        for name in list(sizes):
            if name in keep:
                continue
            ins = [lk for lk in links if lk.dst == name]
            outs = [lk for lk in links if lk.src == name]
            if len(ins) != 1 or ins[0].kind != "weight" or len(outs) != 1:
                continue
            out = outs[0]
            if out.kind != "pass" or out.offset or out.first or \
                    out.count not in (None, sizes[name]):
                continue
            links[links.index(ins[0])] = replace(ins[0], dst=out.dst)
            links.remove(out)
            del sizes[name]
            follow.setdefault(out.dst, []).extend(follow.pop(name, []))
            changed = True
