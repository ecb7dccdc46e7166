"""TEST DOUBLE for poptorch (not PopTorch): records calls, runs nothing on an IPU.

Every function and ``Options`` method it offers is generated from ``../shared/poptorch_api.json``
(the public names and parameter names of PopTorch 3.4), so a call with a name or keyword that
real PopTorch does not have fails here too (``TypeError`` / ``AttributeError``).

Recorded: ``blocks`` (module, user_id, ipu_id) in BeginBlock order, the ipu each module ran on
(``executed``: BeginBlock installs a forward pre-hook, as the real one does), ``options`` calls
(dotted method path, bound arguments), ``custom_ops`` and ``inference_models``.

It fails loudly where the real SDK would (each check cites where PopTorch 3.4 does it):

* an input whose dimension 0 is not a multiple of deviceIterations x replicas
  (python/_poplar_executor.py ``_narrow_tensor``); each replica / iteration then gets its slice;
* an in-place buffer update under replication without ``broadcastBuffers(False)``
  (InplaceOps.cpp: "PopTorch does not support broadcasting buffers");
* a custom op in the reserved domain ``ai.graphcore`` (PopART's custom-op guide);
* any op PopTorch 3.4 cannot lower ("Unsupported ops found in compiled model"), judged by
  ``ipu_sparse.ipu.opcheck`` with the same op table as ``ipu-sparse ipu-check``.
"""
from __future__ import annotations

import inspect
import json
import types
from pathlib import Path
from typing import Any, Dict, List

import torch

API_PATH = Path(__file__).resolve().parents[3] / "shared" / "poptorch_api.json"


def load_api() -> dict:
    return json.loads(API_PATH.read_text())


def _signature(params: List[str]) -> inspect.Signature:
    out = []
    for name in params:
        if name == "self":
            continue
        if name.startswith("**"):
            out.append(inspect.Parameter(name[2:], inspect.Parameter.VAR_KEYWORD))
        elif name.startswith("*"):
            out.append(inspect.Parameter(name[1:], inspect.Parameter.VAR_POSITIONAL))
        else:  # PopTorch gives most parameters defaults; the double treats all as optional
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
            if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in out):
                kind = inspect.Parameter.KEYWORD_ONLY
            out.append(inspect.Parameter(name, kind, default=None))
    return inspect.Signature(out)


class _Recorder:
    """An options object whose methods are exactly those listed for ``class_name``."""

    def __init__(self, double: "PoptorchDouble", class_name: str, path: str):
        self._double, self._class, self._path = double, class_name, path
        self._members = double.api["classes"][class_name]["members"]

    def __getattr__(self, name):
        members = self.__dict__.get("_members", {})
        if name not in members:
            raise AttributeError(f"poptorch {self._class} has no member {name!r} (per poptorch_api.json)")
        params = members[name]
        sub = {"Precision": "_PrecisionOptions", "Training": "_TrainingOptions", "Jit": "_JitOptions",
               "TensorLocations": "_TensorLocationOptions", "Distributed": "_DistributedOptions"}
        if name in sub:  # properties returning sub-option objects
            return _Recorder(self._double, sub[name], f"{self._path}.{name}")
        sig = _signature(params if isinstance(params, list) else [])

        def method(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)  # raises TypeError on a wrong keyword, like PopTorch
            self._double.options_calls.append((f"{self._path}.{name}", dict(bound.arguments)))
            self.__dict__.setdefault("_set", {})[name] = dict(bound.arguments)
            return self

        return method


class FakeOptions(_Recorder):
    def __init__(self, double: "PoptorchDouble"):
        super().__init__(double, "Options", "Options")
        # _Popart is an instance attribute of the real Options (not in the public-name list).
        self.__dict__["_Popart"] = _Recorder(double, "_PopartOptions", "Options._Popart")


class FakeExecutor:
    def __init__(self, double, model, options):
        self.double, self.model, self.options = double, model, options
        self.compiled_with = None
        self.exported_to = None
        self.detached = False
        self.trace = None

    def _setting(self, name, key, default):
        set_ = getattr(self.options, "__dict__", {}).get("_set", {}) if self.options is not None else {}
        return set_.get(name, {}).get(key, default)

    @property
    def split(self) -> int:
        """deviceIterations x replicas: how PopTorch splits dimension 0 of every input."""
        return (self._setting("deviceIterations", "device_iterations", 1)
                * self._setting("replicationFactor", "replication_factor", 1))

    def _chunks(self, args):
        n = self.split
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] % n):
                raise RuntimeError(f"test double (as PopTorch _narrow_tensor): input {i} of shape {tuple(a.shape)}: "
                                   f"dimension 0 must be a multiple of deviceIterations x replicas = {n}")
        rows = [a.shape[0] // n if isinstance(a, torch.Tensor) else None for a in args]
        return [tuple(a[k * r:(k + 1) * r] if r is not None else a for a, r in zip(args, rows)) for k in range(n)]

    def compile(self, *args, **kwargs):
        from ipu_sparse.ipu.opcheck import OpTracer

        self.compiled_with = args
        chunk = self._chunks(args)[0]
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        tracer = OpTracer(self.model)
        with torch.no_grad(), tracer:  # a trace-like run on CPU (custom ops use their reference)
            self.model(*chunk)
        self.trace = tracer.report
        written = [n for n, b in self.model.named_buffers() if n in buffers and not torch.equal(b, buffers[n])]
        if written and self._setting("replicationFactor", "replication_factor", 1) > 1 \
                and self._setting("broadcastBuffers", "broadcast_buffers", True) is not False:
            raise RuntimeError(f"test double (as PopTorch InplaceOps.cpp): buffers {written[:3]} are updated in place "
                               "under replication: PopTorch does not support broadcasting buffers; "
                               "set opts.broadcastBuffers(False)")
        for p in tracer.report.problems:
            raise RuntimeError(f"test double: {p}")
        bad = tracer.report.unlowerable
        if bad:
            raise RuntimeError("test double (as PopTorch ErrorOnUnsupportedAten): Unsupported ops found in compiled "
                               "model: " + ", ".join(f"aten::{r.name} ({r.module})" for r in bad))
        for n, b in buffers.items():  # compiling runs nothing on the device: restore the buffers
            dict(self.model.named_buffers())[n].copy_(b)

    def compileAndExport(self, filename, *args, export_model=True, **kwargs):
        self.exported_to = filename
        self.compile(*args)

    def __call__(self, *args):
        if self.compiled_with is None:
            self.compile(*args)
        with torch.no_grad():  # every replica / device iteration runs its own slice (OutputMode.All)
            outs = [self.model(*chunk) for chunk in self._chunks(args)]
        return torch.cat(outs, dim=0)

    def detachFromDevice(self):
        self.detached = True

    def destroy(self):
        self.detached = True


class PoptorchDouble(types.ModuleType):
    """Install with ``monkeypatch.setitem(sys.modules, "poptorch", PoptorchDouble())``."""

    def __init__(self, running_on_ipu: bool = False):
        super().__init__("poptorch")
        self.api = load_api()
        self.blocks: List[tuple] = []
        self.executed: List[tuple] = []
        self.options_calls: List[tuple] = []
        self.custom_ops: List[Dict[str, Any]] = []
        self.inference_models: List[FakeExecutor] = []
        self.removed: List[torch.nn.Module] = []
        self._running = running_on_ipu
        self._hooks: List[Any] = []
        enums = {n: c for n, c in self.api["classes"].items() if c["module"] == "enums"}
        for name, cls in enums.items():
            setattr(self, name, types.SimpleNamespace(**{m: f"{name}.{m}" for m in cls["members"]}))
        for fn in self.api["functions"]:
            if not hasattr(type(self), fn):
                setattr(self, fn, self._unimplemented(fn))

    def _check(self, fn: str, *args, **kwargs):
        return _signature(self.api["functions"][fn]["params"]).bind(*args, **kwargs)

    @staticmethod
    def _unimplemented(fn):
        def f(*args, **kwargs):
            raise NotImplementedError(f"test double: poptorch.{fn} is not modelled")
        return f

    # -- functions used by ipu_sparse --
    def BeginBlock(self, layer_to_call, user_id=None, ipu_id=None):
        self._check("BeginBlock", layer_to_call, user_id=user_id, ipu_id=ipu_id)
        if not isinstance(layer_to_call, torch.nn.Module):
            raise TypeError("BeginBlock needs an nn.Module")
        self.blocks.append((layer_to_call, user_id, ipu_id))

        def hook(module, inputs):
            self.executed.append((user_id, ipu_id))

        handle = layer_to_call.register_forward_pre_hook(hook)
        layer_to_call.__dict__["_double_block_handle"] = handle
        return layer_to_call

    def removeBlocks(self, module):
        self._check("removeBlocks", module)
        for m in module.modules():
            handle = m.__dict__.pop("_double_block_handle", None)
            if handle is not None:
                handle.remove()
        self.removed.append(module)

    def ipuHardwareIsAvailable(self, num_ipus=1):
        self._check("ipuHardwareIsAvailable", num_ipus)
        return False

    def isRunningOnIpu(self):
        self._check("isRunningOnIpu")
        return self._running

    def custom_op(self, inputs, name, domain, domain_version, example_outputs, attributes=None):
        self._check("custom_op", inputs, name, domain, domain_version, example_outputs, attributes=attributes)
        if domain == "ai.graphcore":
            raise RuntimeError(f"test double: custom op {name} uses the domain 'ai.graphcore', which PopART "
                               "reserves (custom_ops.rst: a custom op must never use it)")
        self.custom_ops.append({"name": name, "domain": domain, "version": domain_version,
                                "inputs": [tuple(t.shape) for t in inputs], "attributes": dict(attributes or {})})
        return [torch.zeros_like(e) for e in example_outputs]

    def Options(self):
        return FakeOptions(self)

    def ShardedExecution(self, *args):
        return ("ShardedExecution", args)

    def PipelinedExecution(self, *args):
        return ("PipelinedExecution", args)

    def inferenceModel(self, model, options=None):
        self._check("inferenceModel", model, options)
        ex = FakeExecutor(self, model, options)
        self.inference_models.append(ex)
        return ex

    # -- queries for tests --
    def option(self, path: str):
        """Arguments of the last call of ``path`` (e.g. "Options.deviceIterations"), or None."""
        for p, args in reversed(self.options_calls):
            if p == path:
                return args
        return None
