"""The error every reader raises for bad input: it names the file and the field."""
from __future__ import annotations

from ..errors import InputError


class CaseFormatError(InputError):
    """Bad or missing input. ``file`` and ``field`` say where; the message says what was expected."""

    def __init__(self, file, field: str | None, message: str):
        self.file = str(file)
        self.field = field
        where = f"{self.file}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")
