"""A stand-in for vLLM, for tests on machines without a GPU (vLLM's wheel is CUDA-only).

Put its parent folder first on ``sys.path`` (``monkeypatch.syspath_prepend``) and ``import vllm``
gives this package. It has the shapes of the real API that metareward uses, with the same names
and fields: ``LLM(model=..., **engine_args)``, ``LLM.generate(prompts, sampling_params, use_tqdm=...)``
returning ``RequestOutput``/``CompletionOutput`` with ``Logprob`` dicts, ``SamplingParams``,
``TokensPrompt``, ``llm.llm_engine.engine_core.shutdown()`` and
``vllm.distributed.parallel_state.cleanup_dist_env_and_memory()``.

No model runs: a test sets ``LLM.script`` (see :class:`vllm.entrypoints.llm.Script`) to say which
tokens each sample generates and which next-token log-probabilities the model has. Every engine
built is kept in ``LLM.instances``; each records its arguments, its ``generate`` calls and its
shutdowns for the test to check, and ``LLM.events`` lists builds, calls and shutdowns in order.
"""

from vllm.entrypoints.llm import LLM
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

__version__ = "0.0.0+standin"
__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "TokensPrompt"]
