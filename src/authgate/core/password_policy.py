"""The password policy: length bounds and a check against a bundled list of common passwords."""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources

from authgate.core.errors import AuthError, ErrorCode


@cache
def common_passwords() -> frozenset[str]:
    data = resources.files("authgate.data").joinpath("common-passwords.txt.gz").read_bytes()
    return frozenset(line.strip() for line in gzip.decompress(data).decode().splitlines())


class PasswordPolicy:
    def __init__(self, *, min_length: int, max_length: int, reject_common: bool) -> None:
        self.min_length = min_length
        self.max_length = max_length
        self.reject_common = reject_common

    def describe(self) -> dict[str, object]:
        return {"min_length": self.min_length, "max_length": self.max_length,
                "reject_common": self.reject_common}

    def problems(self, password: str, *, related: tuple[str | None, ...] = ()) -> list[str]:
        found = []
        if len(password) < self.min_length:
            found.append(f"must be at least {self.min_length} characters")
        if len(password) > self.max_length:
            found.append(f"must be at most {self.max_length} characters")
        lowered = password.casefold()
        if self.reject_common and lowered in common_passwords():
            found.append("is too common")
        for value in related:
            if value and len(value) >= 4 and lowered == value.casefold():
                found.append("must not be the same as the login id")
                break
        return found

    def check(self, password: str, *, related: tuple[str | None, ...] = ()) -> None:
        problems = self.problems(password, related=related)
        if problems:
            raise AuthError(ErrorCode.WEAK_PASSWORD, "The password " + "; ".join(problems) + ".",
                            details={"problems": problems})
