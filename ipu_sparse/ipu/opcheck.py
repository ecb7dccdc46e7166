"""Which ops of an IPU graph PopTorch 3.4 could lower, checked on CPU before any IPU sees it.

How PopTorch 3.x sees a graph (``data/poptorch_ops.json``, extracted from graphcore/poptorch
sdk/poptorch/3.4.0): the model runs on the ``IPU`` dispatch key, so PyTorch's
CompositeImplicitAutograd decompositions have already happened; ops PopTorch registers for the
IPU key (``intercepted_before_decomposition``) are recorded as they are; ops with a
CompositeExplicitAutograd(NonFunctional) kernel run that kernel and PopTorch sees what it calls;
everything else reaches PopTorch's boxed fallback and is recorded by its schema name (overload
dropped). In-place ops are made out-of-place by dropping the trailing ``_`` (``zero_`` ->
``zeros_like``, ``fill_`` -> ``full_like``; ``copy_`` and the random in-place ops stay), then a
handler is looked up by exact name; an op left without one stops compilation with
"Unsupported ops found in compiled model".

``OpTracer`` reproduces that on CPU with ``TorchDispatchMode`` (which sees ops at the same
level: after implicit decompositions) and the same renaming and exact lookup. An op PopTorch
intercepts, or whose name has a handler, is accepted as it is; an op without a handler that has
a composite kernel runs that kernel under the trace so its callees are judged (``_to_copy`` ->
``empty`` + ``copy_``; ``index_copy_`` -> ``index_copy.out``: no handler); ops returning no
tensor (``result_type``) are metadata queries, not graph nodes. The tracer
records, for every op, the innermost module that emitted it and the IPU of its block. A
few public functions that have no handler are also caught one level up (``TorchFunctionMode``):
on torch 2.0.1's CPU path ``scaled_dot_product_attention`` decomposes into lowerable math, but
on the IPU it is not lowered (``not_handled_examples`` in the table), so its call is flagged
whatever this torch does with it.

Custom ops (``IpuSparseLinear``) are recorded as the ``poptorch.custom_op`` call they make on an
IPU, with the same arguments, and their CPU reference kernel is not traced.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

OP_TABLE_PATH = Path(__file__).resolve().parent / "data" / "poptorch_ops.json"
RESERVED_DOMAINS = ("ai.graphcore",)  # PopART's custom-op guide: never a custom op's domain

_COMPOSITE_KEYS = ("CompositeExplicitAutogradNonFunctional", "CompositeExplicitAutograd")


@dataclass
class OpTable:
    """PopTorch 3.4's op coverage (handlers, dispatcher-handled ops, in-place rules)."""

    handlers: Set[str]
    dispatcher: Set[str]
    intercepted: Set[str]
    only_inplace: Set[str]
    inplace_map: Dict[str, str]
    not_handled_functions: Set[str]
    source: str = ""

    @classmethod
    def load(cls, path=None) -> "OpTable":
        data = json.loads(Path(path or OP_TABLE_PATH).read_text())
        dispatcher: Set[str] = set()
        for key, text in data["dispatcher_ops"].items():
            if key.startswith("view ops"):
                dispatcher.update(text.split())
            elif " " not in key:  # "empty": "JitDispatch::empty / empty_strided" covers both names
                dispatcher.add(key)
                dispatcher.update(w for w in re.findall(r"[A-Za-z_]+", text) if w.startswith(key))
        rules = data["dispatch_rules"]["in-place to out-of-place names (torch inPlaceToOutOfPlace, used by PopTorch)"]
        inplace_map = {k: v for k, v in rules.items() if k != "otherwise"}
        not_handled: Set[str] = set()
        for key in data["not_handled_examples"]:
            not_handled.update(k.strip() for k in key.split("/"))
        return cls(handlers=set(data["handlers"]), dispatcher=dispatcher,
                   intercepted=set(data["intercepted_before_decomposition"]),
                   only_inplace=set(data["only_inplace_ops"]), inplace_map=inplace_map,
                   not_handled_functions=not_handled, source=data.get("source", ""))

    def outplace_name(self, name: str) -> str:
        """The name PopTorch looks a handler up by (InplaceOps.cpp: trailing ``_`` dropped)."""
        if name in self.inplace_map:
            return self.inplace_map[name]
        if name.endswith("_") and not name.endswith("__") and name not in self.only_inplace:
            return name[:-1]
        return name

    def is_intercepted(self, name: str, overload: str) -> bool:
        return name in self.intercepted or f"{name}.{overload}" in self.intercepted

    def lowerable(self, name: str) -> bool:
        """Does a recorded op of this schema name reach a handler (or the dispatcher's own handling)?"""
        if name in self.dispatcher:
            return True
        return self.outplace_name(name) in self.handlers or self.outplace_name(name) in self.dispatcher


@dataclass
class OpRecord:
    name: str          # schema name as recorded (overload dropped), e.g. "index_copy"
    lowered_as: str    # the handler name PopTorch looks up
    module: str        # innermost module that emitted it ("" = the traced root)
    ipu: Optional[int]  # IPU of the enclosing BeginBlock, when known
    lowerable: bool
    count: int = 1
    note: str = ""
    level: str = "aten"  # "aten": a dispatched op; "function": a public torch function call


@dataclass
class TraceReport:
    ops: "OrderedDict[Tuple[str, str, str], OpRecord]" = field(default_factory=OrderedDict)
    custom_ops: List[dict] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)   # not op coverage: custom-op domain, inputs, ...

    @property
    def unlowerable(self) -> List[OpRecord]:
        return [r for r in self.ops.values() if not r.lowerable]

    @property
    def ok(self) -> bool:
        return not self.unlowerable and not self.problems

    def add(self, rec: OpRecord) -> None:
        key = (rec.level, rec.name, rec.module)
        if key in self.ops:
            self.ops[key].count += 1
        else:
            self.ops[key] = rec

    def format(self) -> str:
        lines = []
        names = sorted({r.lowered_as for r in self.ops.values() if r.lowerable})
        lines.append(f"lowerable aten ops ({len(names)}): {' '.join(names)}")
        for c in self.custom_ops:
            lines.append(f"custom op {c['domain']}::{c['name']} v{c['version']} in {c['module']} "
                         f"(IPU{c['ipu']}), inputs {c['inputs']}")
        for r in self.unlowerable:
            ipu = "" if r.ipu is None else f" on IPU{r.ipu}"
            what = f"aten::{r.name}" if r.level == "aten" else f"call of torch function {r.name}()"
            lines.append(f"UNSUPPORTED {what} (PopTorch looks up '{r.lowered_as}': no handler) "
                         f"x{r.count} in {r.module or '<root>'}{ipu}{' - ' + r.note if r.note else ''}")
        for p in self.problems:
            lines.append(f"PROBLEM {p}")
        return "\n".join(lines)


# ----- the trace -----------------------------------------------------------------------------

_active = threading.local()


def active_tracer() -> Optional["OpTracer"]:
    """The tracer recording this thread's ops (``IpuSparseLinear`` reports its custom op to it)."""
    return getattr(_active, "tracer", None)


class _FunctionLevel(TorchFunctionMode):
    """Flags calls of public functions PopTorch 3.4 cannot lower, before this torch decomposes them."""

    def __init__(self, tracer: "OpTracer"):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.tracer.table.not_handled_functions and not self.tracer.paused:
            self.tracer.record(name, lowerable=False, level="function",
                               note="not_handled_examples of poptorch_ops.json")
        return func(*args, **(kwargs or {}))


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, tracer: "OpTracer"):
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = self.tracer
        if t.paused:
            return func(*args, **kwargs)
        name = func._schema.name.split("::", 1)[-1]
        overload = func._overloadname
        if t.table.is_intercepted(name, overload) or t.table.lowerable(name):
            t.record(name, lowerable=t.table.lowerable(name))
            return func(*args, **kwargs)
        if not any("Tensor" in str(r.type) for r in func._schema.returns):
            return func(*args, **kwargs)  # a metadata query (e.g. result_type): no graph node
        qualified = func._schema.name + ("" if overload == "default" else "." + overload)
        for key in _COMPOSITE_KEYS:
            if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
                # PopTorch runs this composite kernel on the IPU tensors and sees what it calls.
                with self:
                    return func._op_dk(getattr(torch._C.DispatchKey, key), *args, **kwargs)
        t.record(name, lowerable=False)
        return func(*args, **kwargs)


class OpTracer:
    """Context manager: run an IPU graph's forward on CPU and record what PopTorch would see.

    ``module_ipus``: {module: ipu} from the BeginBlock calls (the block of the innermost
    annotated module an op runs in gives its IPU)."""

    def __init__(self, root: nn.Module, table: Optional[OpTable] = None,
                 module_ipus: Optional[Dict[nn.Module, int]] = None):
        self.root, self.table = root, table or OpTable.load()
        self.report = TraceReport()
        self.module_ipus = dict(module_ipus or {})
        self._names = {m: n for n, m in root.named_modules()}
        self._stack: List[nn.Module] = []
        self._ipu: Optional[int] = None
        self._handles: list = []
        self._pause = 0
        self._modes: list = []

    @property
    def paused(self) -> bool:
        return self._pause > 0

    @property
    def module_name(self) -> str:
        return self._names.get(self._stack[-1], "?") if self._stack else ""

    def record(self, name: str, lowerable: bool, note: str = "", level: str = "aten") -> None:
        lowered = self.table.outplace_name(name)
        self.report.add(OpRecord(name, lowered, self.module_name, self._ipu, lowerable, note=note, level=level))

    def custom_op(self, module: nn.Module, inputs: Sequence[torch.Tensor], name: str, domain: str,
                  domain_version: int, example_outputs: Sequence[torch.Tensor], attributes: Optional[dict]):
        """Record a ``poptorch.custom_op`` call as PopTorch would receive it; check what the SDK checks."""
        where = self._names.get(module, "?")
        self.report.custom_ops.append({"name": name, "domain": domain, "version": domain_version,
                                       "module": where, "ipu": self._ipu,
                                       "inputs": [tuple(x.shape) for x in inputs]})
        if domain in RESERVED_DOMAINS:
            self.report.problems.append(f"custom op {name} in {where} uses the reserved domain {domain!r} "
                                        "(PopART's custom-op guide: never ai.graphcore)")
        for key, v in (attributes or {}).items():
            if isinstance(v, torch.Tensor) or v is None:
                self.report.problems.append(f"custom op {name} in {where}: attribute {key!r} is {v!r} "
                                            "(attributes must be plain ints, floats or strings)")
        for x, e in zip(inputs[:1], example_outputs[:1]):
            if e.device != x.device:
                self.report.problems.append(f"custom op {name} in {where}: example output on {e.device}, "
                                            f"input on {x.device}")

    def paused_region(self):
        tracer = self

        class _Pause:
            def __enter__(self):
                tracer._pause += 1

            def __exit__(self, *exc):
                tracer._pause -= 1

        return _Pause()

    # -- module stack (which module emits an op, which IPU it is on) --
    def _pre(self, module, inputs):
        self._stack.append(module)
        if module in self.module_ipus:  # BeginBlock: this module and everything after it, until the next block
            self._ipu = self.module_ipus[module]

    def _post(self, module, inputs, output):
        self._stack.pop()

    def __enter__(self) -> "OpTracer":
        for m in self.root.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))
        _active.tracer = self
        self._modes = [_FunctionLevel(self), _DispatchLevel(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
        _active.tracer = None
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


def trace_ops(root: nn.Module, calls: Sequence[Tuple[tuple, dict]], module_ipus=None,
              table: Optional[OpTable] = None) -> TraceReport:
    """Run ``root(*args, **kwargs)`` for each call under one trace; returns the report."""
    tracer = OpTracer(root, table=table, module_ipus=module_ipus)
    with torch.no_grad(), tracer:
        for args, kwargs in calls:
            root(*args, **kwargs)
    return tracer.report
