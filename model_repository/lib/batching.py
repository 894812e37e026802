"""One dynamic batch: join the requests, run them once, split the results back, errors per request.

Every batched python model needs the same three rules, so they live here once:
- a request that cannot be read (bad text, image, NaN tensor) fails alone, with INVALID_ARG and
  the reader's message, before anything runs;
- the readable ones run joined, in one call;
- if that joined call raises, each request runs again alone, so only the one(s) the runtime
  rejects fail (with the code the model chose: INTERNAL for a runtime fault, INVALID_ARG where
  the runtime's complaint is about the input, e.g. a shape).

Plain Python (no Triton import): the thin models turn `Failure` into a TritonError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar, Union

Parsed = TypeVar("Parsed")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Failure:
    """Why one request got no result; `internal` means the server, not the request, failed."""

    message: str
    internal: bool = False


def read_each(requests: Sequence[object], read: Callable[[object], Parsed]) -> list[Union[Parsed, Failure]]:
    """`read` every request; a ValueError (what every reader raises for bad input) fails only its own."""
    parsed: list[Union[Parsed, Failure]] = []
    for request in requests:
        try:
            parsed.append(read(request))
        except ValueError as err:
            parsed.append(Failure(str(err)))
    return parsed


def run_joined(parsed: Sequence[Union[Parsed, Failure]],
               run: Callable[[list[Parsed]], list[Union[Result, Failure]]],
               model: str, runtime_fault_is_internal: bool = True) -> list[Union[Result, Failure]]:
    """Run every readable request in one `run` call (which returns one result or Failure per
    request, in order); on an exception, each alone. Failures already in `parsed` pass through."""
    good = [j for j, p in enumerate(parsed) if not isinstance(p, Failure)]
    results: list[Union[Result, Failure]] = list(parsed)  # failures stay where they are
    if not good:
        return results
    try:
        for j, result in zip(good, run([parsed[j] for j in good]), strict=True):
            results[j] = result
        return results
    except Exception as joined_error:  # noqa: BLE001 - one bad request must not fail the batch
        if len(good) == 1:
            results[good[0]] = _fault(model, joined_error, runtime_fault_is_internal)
            return results
    for j in good:
        try:
            results[j] = run([parsed[j]])[0]
        except Exception as alone:  # noqa: BLE001
            results[j] = _fault(model, alone, runtime_fault_is_internal)
    return results


def _fault(model: str, err: Exception, internal: bool) -> Failure:
    return Failure(f"{model}: {type(err).__name__}: {err}", internal=internal)

