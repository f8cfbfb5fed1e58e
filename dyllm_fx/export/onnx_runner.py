"""Run an exported dyllm step graph with onnxruntime, as a model ``dyllm_fx.generate`` takes.

    model = dyllm_fx.export.load_onnx("step.onnx")
    out = dyllm_fx.generate(model, model.tokenizer, ["shift:abc="])

The caches stay in onnxruntime's memory between steps (``OrtValue`` through I/O binding, on
the GPU under the CUDA provider); only the token ids, the row set and the block's logits
cross to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dyllm_fx.loading import load_tokenizer, resolve_model_path
from dyllm_fx.runtime.policies import Policy

from .driver import ExportedStepModel, PlanStepModel, build_policy, plan_policy
from .metadata import NotAStepGraphError, StepGraphInfo

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "running an ONNX step graph needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu for "
            "CUDA), "
            'or pip install "dyllm-fx[onnx]"'
        ) from err
    return onnxruntime


def _check_dtype(dtype: str) -> None:
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(
            f"the ONNX runner allocates its caches with numpy, which has no {dtype}; export a float32 or "
            "float16 model (dyllm export --dtype float32, or dyllm_fx.load(..., dtype=torch.float32))"
        )


class OrtBackend:
    """A step graph in an onnxruntime session; caches are ``OrtValue`` on the session's device."""

    def __init__(self, session, info: StepGraphInfo):
        self.session = session
        self.info = info
        self.device = "cuda" if session.get_providers()[0] in _GPU_PROVIDERS else "cpu"
        self.cache_inputs = info.inputs[5:]
        self.cache_outputs = info.outputs[1:]
        for dtype in {info.hidden_dtype, info.kv_dtype}:
            _check_dtype(dtype)

    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        _check_dtype(dtype)
        ort = _ort()
        return ort.OrtValue.ortvalue_from_numpy(
            np.zeros(tuple(shape), dtype=_NUMPY_DTYPES[dtype]), self.device, 0
        )

    def run(self, inputs: dict[str, torch.Tensor], caches: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        binding = self.session.io_binding()
        host = {name: t.numpy() for name, t in inputs.items()}  # kept alive until the run ends
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.cache_inputs, caches):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.cache_outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return torch.from_numpy(outputs[0].numpy()), list(outputs[1:])


class OrtPlanBackend:
    """A plan step graph (one ``If`` branch per kind of step) in an onnxruntime session; the cache
    and the policy's buffers are ``OrtValue`` on the session's device between steps, bound
    by I/O binding (the host sends ids, spans, the plan index and parameters; it gets logits,
    eligible and counts back)."""

    HOST_OUTPUTS = ("logits", "eligible", "counts")

    def __init__(self, session, info: StepGraphInfo):
        self.session = session
        self.info = info
        self.device = "cuda" if session.get_providers()[0] in _GPU_PROVIDERS else "cpu"
        n_host = len(info.inputs) - len(info.state)
        self.state_inputs = info.inputs[n_host:]
        self.state_outputs = info.outputs[len(self.HOST_OUTPUTS) :]

    def zeros(self, entry, batch: int, seq_len: int) -> Any:
        dtype = {"int64": np.int64, "bool": np.bool_, **_NUMPY_DTYPES}.get(entry.dtype)
        if dtype is None:
            _check_dtype(entry.dtype)
        array = np.full(entry.concrete(batch, seq_len), entry.fill, dtype=dtype)
        return _ort().OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def run(self, index: int, inputs: dict[str, torch.Tensor], state: list[Any]) -> tuple:
        binding = self.session.io_binding()
        host = {name: t.numpy() for name, t in inputs.items()}  # kept alive until the run ends
        host["plan"] = np.array(index, dtype=np.int64)
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.state_inputs, state):
            binding.bind_ortvalue_input(name, value)
        for name in self.HOST_OUTPUTS:
            binding.bind_output(name, "cpu")
        for name in self.state_outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits, eligible, counts = (torch.from_numpy(o.numpy()) for o in outputs[:3])
        return logits, eligible, counts, list(outputs[3:])


def _providers(device: str | None, providers: Sequence[str] | None) -> list[str]:
    available = _ort().get_available_providers()
    if providers is not None:
        return list(providers)
    if device is None:
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ValueError(
                f"device={device!r} but this onnxruntime has no CUDA provider (available: {available}); "
                "pip install onnxruntime-gpu, or use device='cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if str(device) != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return ["CPUExecutionProvider"]


def read_step_graph(session, source: str) -> StepGraphInfo:
    """The dyllm metadata of an onnxruntime session's model; raises NotAStepGraphError."""
    info = StepGraphInfo.from_props(dict(session.get_modelmeta().custom_metadata_map), source)
    names = [i.name for i in session.get_inputs()]
    expected = info.inputs + (["plan"] if info.graph == "plans" else [])
    if names != expected:
        raise NotAStepGraphError(
            f"{source}: its inputs {names} differ from those its metadata lists {expected}; "
            "export it again with `dyllm export --onnx`"
        )
    return info


class _Tokenizer:
    """The ``tokenizer`` property of the ONNX models: the one given to ``load_onnx``, else the
    tokenizer of the model folder the file records, loaded on first use."""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.info.model_path:
                raise ValueError(
                    f"{self.path} records no model folder to load a tokenizer from; pass tokenizer= to "
                    "load_onnx "
                    "(CLI: --model FOLDER), or export with model_path=FOLDER (`dyllm export --model FOLDER`)"
                )
            self._tokenizer = load_tokenizer(resolve_model_path(self.info.model_path))
        return self._tokenizer


class OnnxPlanModel(_Tokenizer, PlanStepModel):
    """A row policy's exported step (one branch per kind of step) in onnxruntime; pass it to
    ``dyllm_fx.generate`` as the model. ``engine.records`` holds each step's report."""

    def __init__(self, path: Path, session, info: StepGraphInfo, policy: Policy, tokenizer=None):
        super().__init__(OrtPlanBackend(session, info), info, policy)
        self.path = path
        self.session = session
        self._tokenizer = tokenizer


class OnnxStepModel(_Tokenizer, ExportedStepModel):
    """A layer-uniform step graph in onnxruntime; pass it to ``dyllm_fx.generate`` as the model.

    Attributes: ``info`` (the file's metadata), ``policy``, ``session``, ``tokenizer`` (the
    recorded model folder's tokenizer, loaded on first use, or the one given to load_onnx).
    """

    def __init__(self, path: Path, session, info: StepGraphInfo, policy: Policy, tokenizer=None):
        super().__init__(OrtBackend(session, info), info, policy)
        self.path = path
        self.session = session
        self._tokenizer = tokenizer


def load_onnx(
    path: str | Path,
    *,
    device: str | None = None,
    providers: Sequence[str] | None = None,
    policy: str | Policy | None = None,
    tokenizer=None,
    threads: int | None = None,
    policy_args: dict | None = None,
) -> "OnnxStepModel | OnnxPlanModel":
    """Open a step graph written by :func:`~dyllm_fx.export.to_onnx` (``dyllm export --onnx``).

    Args:
        path: the ``.onnx`` file. Anything else raises ``NotAStepGraphError`` (a ValueError)
            naming the missing metadata.
        device: ``"cpu"`` or ``"cuda"`` (onnxruntime-gpu); default CUDA when onnxruntime has it.
        providers: onnxruntime execution providers, overriding ``device``.
        policy: the row policy; default the one the graph was exported with. A layer-uniform
            graph runs any layer-uniform policy (it takes the rows as an input); a row policy's
            graph (DyLLM, ES-dLLM, dLLM-Cache) runs only its own policy, with the exported
            parameters except those that are graph inputs (DyLLM's tau).
        policy_args: for a row policy's graph, new values of its input parameters, e.g.
            ``{"tau": 0.995}`` (no re-export needed).
        tokenizer: overrides the tokenizer of the model folder recorded at export.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ONNX file {str(path)!r} does not exist; export one with `dyllm export --onnx {path}`"
        )
    ort = _ort()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    state = ort.capi.onnxruntime_pybind11_state
    names = ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "Fail", "NotImplemented")
    unreadable = tuple(getattr(state, n) for n in names if hasattr(state, n))
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=_providers(device, providers)
        )
    except unreadable as err:
        raise NotAStepGraphError(
            f"{path} is not a dyllm step graph (onnxruntime cannot load it: {str(err).strip()[:200]}); "
            "export one with `dyllm export --onnx`"
        ) from err
    info = read_step_graph(session, str(path))
    if info.graph == "plans":
        return OnnxPlanModel(path, session, info, plan_policy(info, policy, policy_args), tokenizer)
    if policy_args:
        policy = build_policy(info, policy)
        raise ValueError(
            f"policy_args {sorted(policy_args)} given for a layer-uniform step graph (policy "
            f"{policy.name!r}); its "
            "rows come from the host: pass policy=make_policy(name, **params) instead (CLI: --policy NAME "
            "--policy-arg KEY=VALUE)"
        )
    return OnnxStepModel(path, session, info, build_policy(info, policy), tokenizer)


__all__ = ["OnnxPlanModel", "OnnxStepModel", "OrtBackend", "OrtPlanBackend", "load_onnx", "read_step_graph"]
