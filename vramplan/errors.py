"""The one error type the CLI turns into a single line on stderr."""


class VramplanError(ValueError):
    """Bad user input or an unsupported case. ``flag`` names the option at fault."""

    def __init__(self, message: str, flag: str | None = None):
        self.flag = flag
        super().__init__(f"{flag}: {message}" if flag else message)
