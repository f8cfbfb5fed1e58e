"""The ``dyllm`` dynamo backend: ``torch.compile(model, backend="dyllm", options={...})``.

Dynamo hands over the graph of the model's forward. The backend finds the module dynamo is
compiling (the ``self`` of the frame), picks its model adapter (``dyllm_fx.adapters``) and
returns the adapter's callable, with the graph's signature, whose calls go through the
cache-backed sparse step (the same pass pipeline as ``dyllm_fx.transform``), compiled whole by
inductor.

LLaDA / Dream (``adapters/llada_dream_dynamo.py``): the passes need a graph whose sizes are
symbolic, so the backend captures the module itself, as ``transform()`` does. Only when no
module can be found (a compiled free function) does it fall back to dynamo's graph, which then
must have been traced with ``dynamic=True``.

Options:
    policy: policy name, composition or object (default "dense"); other keys are the policy's
        parameters.
    compile_step: compile the step with inductor (default True).
    mask_token_id: lets the step tell a new generation from the next step of the current one,
        and where the response starts; without it every call recomputes all rows (correct, but
        nothing is reused).
    block_length: the generation's block length, for the block caches and the row policies
        composed with them (default: the whole response is one block).

DiffusionGemma (``adapters/diffusion_gemma_dynamo.py``): dynamo's graph of a decoder call
(``model(decoder_input_ids=..., cache=..., self_conditioning_logits=..., ...)``, which is what
its generation loop calls every step) has the step's inputs as graph inputs; the backend maps
them back by their source (``L['kwargs']['cache'].layers[3].keys`` ...) and runs them through
one transformed model per compiled module (shared by the graphs dynamo builds for the first
step, the later ones and new shapes, so one engine sees every step). Graphs of other calls
(the encoder) run as dynamo gave them.

Registered under the ``torch_dynamo_backends`` entry point and importable directly:
``from dyllm_fx.backend import dyllm_backend``.
"""

from __future__ import annotations

from torch import fx, nn

from .adapters import adapter_for


def _compiled_module(gm: fx.GraphModule) -> nn.Module | None:
    """The module whose forward dynamo is compiling, when it is one (the frame's ``self``) and
    its parameters are the graph's."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError, RuntimeError):  # another torch version: use the graph
        return None
    module = getattr(tx, "f_locals", {}).get("self") if tx is not None else None
    if not isinstance(module, nn.Module):
        return None
    params = {id(p) for p in module.parameters()}
    graph_params = [v for v in gm.parameters()]
    return module if all(id(p) in params for p in graph_params) else None


def dyllm_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    module = _compiled_module(gm)
    return adapter_for(module).dynamo_backend(module, gm, example_inputs, dict(options or {}))
