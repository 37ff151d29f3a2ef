"""Errors the tuner raises, one class per kind of failure.

Hierarchy::

    TunerError                      base; the CLI prints its message on one line and exits non-zero
    ├── GGUFError                   the file is missing, not a GGUF, truncated, or of an unknown architecture
    ├── InventoryError              a device could not be inventoried (bad --gpus spec, unknown GPU name,
    │                               unreachable RPC endpoint, unreadable JSON inventory)
    ├── PlanRequestError            the request itself is inconsistent (bad tensor split, V cache quantised
    │                               without flash attention, n_gpu_layers out of range, ...)
    ├── HubError                    a Hugging Face Hub reference cannot be resolved or read (no such repo,
    │                               file or quantisation; gated; offline; network; checksum mismatch)
    └── DoesNotFitError             a valid request that no placement can hold; carries the plan that came
                                    closest so that callers can show the numbers

Foreign exceptions (OSError, pynvml.NVMLError, llama_cpp failures) are converted where they enter, with
``raise ... from exc``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuner.plan import Plan


class TunerError(Exception):
    """Base class of every error the tuner raises on purpose."""

    exit_code = 2


class GGUFError(TunerError):
    """The model file cannot be read as a GGUF the tuner understands."""


class InventoryError(TunerError):
    """A device inventory could not be built from the driver, the RPC endpoint or the user's spec."""


class PlanRequestError(TunerError):
    """The planning request contradicts itself or the model (not a question of memory)."""


class HubError(TunerError):
    """A model on the Hugging Face Hub cannot be listed, read or downloaded; the message never holds a token."""


class DoesNotFitError(TunerError):
    """No placement holds the model with the requested settings; ``closest`` is the best attempt."""

    exit_code = 3

    def __init__(self, message: str, closest: Plan | None = None) -> None:
        super().__init__(message)
        self.closest = closest
