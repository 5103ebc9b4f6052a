"""The device verification page: server-rendered HTML, every value escaped, CSRF-safe.

CSRF uses a double-submit token: GET sets a random value in an HttpOnly, SameSite=Strict
cookie and the same value in a hidden field; POST must carry both, equal. Nothing is
kept on the server, so it works behind several replicas. The handler also refuses a
POST whose Origin header names another site. The page may not be framed (clickjacking
an "Approve" button is the classic attack on this flow) and nothing is cached.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from html import escape

CSRF_FIELD = "csrf_token"
CSRF_COOKIE = "meshmgmt_csrf"
CSRF_COOKIE_SECURE = "__Host-meshmgmt_csrf"  # https: bound to this origin, Secure, Path=/

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem;color:#1b1f24}"
    "h1{font-size:1.4rem}label{display:block;margin:.8rem 0 .2rem}"
    "input{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}"
    "input[name=user_code]{font-family:monospace;letter-spacing:.15em;text-transform:uppercase}"
    ".actions{margin-top:1.2rem;display:flex;gap:.6rem}"
    "button{padding:.55rem 1.1rem;font-size:1rem;cursor:pointer}"
    ".msg{padding:.6rem .8rem;border-radius:4px;margin:1rem 0}"
    ".error{background:#fde7e9;color:#8a1020}.ok{background:#e6f4ea;color:#0d5b26}"
    ".hint{color:#57606a;font-size:.9rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
}


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def csrf_matches(cookie: str | None, field: str | None) -> bool:
    if not cookie or not field:
        return False
    return hmac.compare_digest(cookie.encode(), field.encode())


def _document(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def render_form(*, csrf: str, user_code: str = "", email: str = "", error: str = "") -> str:
    """The sign-in + approve form. `error` is one of our own fixed messages (still escaped)."""
    err = f'<p class="msg error" role="alert">{escape(error)}</p>' if error else ""
    body = (
        "<h1>Sign in a device to meshsshd</h1>"
        "<p>A command-line client (<code>meshssh login</code>) asked to sign in as you. "
        "Check that the code below matches the one it shows, then sign in to approve it.</p>"
        f"{err}"
        '<form method="post" action="device" autocomplete="on">'
        f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(csrf)}">'
        '<label for="user_code">Code</label>'
        f'<input id="user_code" name="user_code" value="{escape(user_code)}" required '
        'maxlength="16" placeholder="ABCD-EFGH" autocomplete="off" autocapitalize="characters">'
        '<label for="email">Email</label>'
        f'<input id="email" name="email" type="email" value="{escape(email)}" required autocomplete="username">'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" required autocomplete="current-password">'
        '<div class="actions">'
        '<button type="submit" name="action" value="approve">Approve</button>'
        '<button type="submit" name="action" value="deny">Deny</button>'
        "</div></form>"
        '<p class="hint">If you did not start a login, choose Deny.</p>'
    )
    return _document("meshsshd device login", body)


def render_result(*, approved: bool, email: str) -> str:
    if approved:
        body = (
            "<h1>Device approved</h1>"
            f'<p class="msg ok">Signed in as {escape(email)}. You can close this window '
            "and return to your terminal.</p>"
        )
    else:
        body = (
            "<h1>Login denied</h1>"
            '<p class="msg error">The device was not signed in. You can close this window.</p>'
        )
    return _document("meshsshd device login", body)
