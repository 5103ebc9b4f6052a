"""What to change so that a refused request is allowed, named for how the peer is run.

A refusal the user reads must name the fix, and the fix differs by mode: a standalone
`meshsshd serve` takes a key of its TOML file, a managed `meshsshd up` a flag of its own
(persisted in its state directory) or, for what the network map carries, an option of
`meshmgmt serve`. The names here are pinned to the real flags, keys and options by
tests/unit/test_remedies.py, so a renamed flag fails a test instead of misleading users.
"""

from __future__ import annotations

# ServerSettings field → (managed: where it comes from, standalone: the TOML line).
_REMEDIES: dict[str, tuple[str, str]] = {
    "local_port_forwarding": ("meshsshd up --enable-ssh-local-port-forwarding",
                              "local_port_forwarding = true in meshsshd.toml"),
    "remote_port_forwarding": ("meshsshd up --enable-ssh-remote-port-forwarding",
                               "remote_port_forwarding = true in meshsshd.toml"),
    "permit_open": ("the management server's meshmgmt serve --ssh-permit-open",
                    "permit_open in meshsshd.toml"),
    "permit_listen": ("the management server's meshmgmt serve --ssh-permit-listen",
                      "permit_listen in meshsshd.toml"),
}


def remedy(setting: str, *, managed: bool) -> str:
    """The fix for a refusal by `setting` (a ServerSettings field), "" for one no
    setting can lift (e.g. a -R on a wildcard address)."""
    pair = _REMEDIES.get(setting)
    if pair is None:
        return ""
    return pair[0] if managed else pair[1]


def with_remedy(message: str, setting: str, *, managed: bool) -> str:
    """`message (fix)`, or the message alone when there is no fix to name."""
    fix = remedy(setting, managed=managed)
    return f"{message} ({fix})" if fix else message
