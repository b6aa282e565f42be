"""The one error type the CLI turns into a single line on stderr."""

from __future__ import annotations

from pydantic import ValidationError


class VramplanError(ValueError):
    """Bad user input or an unsupported case. ``flag`` names the option at fault."""

    def __init__(self, message: str, flag: str | None = None):
        self.flag = flag
        self.message = message
        super().__init__(f"{flag}: {message}" if flag else message)


def from_validation_error(e: ValidationError) -> VramplanError:
    """A pydantic ValidationError of a model built from command-line values -> one
    VramplanError naming the flag of the first field at fault (``batch_size`` ->
    ``--batch-size``) and, for an enum, the values allowed. A VramplanError our own
    validators raised arrives wrapped in the ValidationError: it is returned as it is."""
    err = e.errors()[0]
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, VramplanError):
        return inner
    loc = err["loc"][0] if err["loc"] else ""
    allowed = f"; allowed: {err['ctx']['expected']}" if err["type"] == "enum" else ""
    return VramplanError(f"{err['msg']} (got {err.get('input')!r}){allowed}", "--" + str(loc).replace("_", "-"))
