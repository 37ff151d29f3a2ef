"""The inference engine: continuous batching on llama.cpp, in a process of its own.

``protocol`` (requests, events, the Engine protocol) and ``errors`` are plain Python: importing them, or this
package, loads neither llama.cpp nor any HTTP module. ``client`` is the HTTP process's side (WorkerProcess,
WorkerEngine, and the Tokenizer it uses); ``worker`` and ``batching`` run in the engine process.
"""

from __future__ import annotations

from server.engine.errors import EngineDeadError, EngineError, EngineRequestError
from server.engine.protocol import (
    Engine,
    EngineStats,
    FinishEvent,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ModelFacts,
    OutputConstraint,
    SamplingParams,
    StepStats,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
)

__all__ = [
    "Engine",
    "EngineDeadError",
    "EngineError",
    "EngineRequestError",
    "EngineStats",
    "FinishEvent",
    "FinishReason",
    "GenerationEvent",
    "GenerationRequest",
    "ModelFacts",
    "OutputConstraint",
    "SamplingParams",
    "StepStats",
    "TokenEvent",
    "TokenLogprob",
    "TopLogprob",
]
