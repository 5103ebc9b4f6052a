"""`meshssh passwd`: change your own password on management (`POST /api/me/password`).

Management checks the current password, holds the new one to the rules of user
creation and signs out every login of the user, this one too; so on success the stored
login is removed here as well (and the control master stopped, which pooled it), and
the person is told to log in again.
"""

from __future__ import annotations

from meshsshd.password_input import PasswordInputError, read_passwords

from . import auth
from .control import stop_master
from .errors import ClientError

DONE = "password changed; your other logins were signed out, log in again with `meshssh login`"


def change_password(*, from_stdin: bool) -> str:
    """Ask, change, sign out here; what to tell the person. ClientError when refused."""
    session = auth.Session()  # before asking: without a login there is nothing to change
    try:
        current, new = read_passwords(("Current password: ", "New password: "), from_stdin=from_stdin)
    except PasswordInputError as exc:
        raise ClientError(str(exc)) from None
    session.call_api("/api/me/password", {"current_password": current, "new_password": new})
    stop_master()
    auth.logout()
    return DONE
