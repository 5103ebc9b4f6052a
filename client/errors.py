"""Exceptions of the client; every one carries a message that names the fix.

    ClientError                 base; `str(exc)` is shown to the person as is; exit 255
    ├── NotLoggedIn             no stored login, or it expired/was revoked
    ├── ManagementError         management answered with an error (or not at all)
    ├── AccessDenied            no policy lets this identity reach that peer
    ├── PeerNotFound            the host is not in this identity's peer list
    ├── HostKeyMismatch         the server's host key is not the one management published
    └── UsageError              bad command line; exit 255 like ssh (2 for sub-commands)

The `exit_code` of each follows OpenSSH: anything that stops a connection from being
made exits 255, so scripts can tell "ssh failed" from "the remote command failed".
"""

from __future__ import annotations


class ClientError(Exception):
    exit_code = 255


LOGIN_FIX = "run `meshssh login`"


class NotLoggedIn(ClientError):
    """No usable login. The fix is said once, by whoever wrote the reason: management's
    refusals of a refresh token name their own (it knows whether a new login helps or an
    administrator must act first: `names_fix`); the client's own reasons get LOGIN_FIX."""

    def __init__(self, detail: str = "not logged in", *, names_fix: bool = False) -> None:
        super().__init__(detail if names_fix else f"{detail} — {LOGIN_FIX}")


class ManagementError(ClientError):
    """code: the OAuth/REST error code (e.g. access_denied), '' when unreachable."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class AccessDenied(ClientError):
    pass


class PeerNotFound(ClientError):
    pass


class HostKeyMismatch(ClientError):
    pass


class UsageError(ClientError):
    pass
