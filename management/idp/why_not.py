"""Why an identity gets no SSH token for a peer, in words that name the fix.

The token exchange refuses with "not SSH-enabled" or "no policy" when the map says so;
an admin (or the user asking) needs to know which of the causes it is: no policy names
the peer at all, the policy that would is disabled, a policy only opens port 22 while the
peer's SSH toggle is off, the user is in no rule of those policies, or the rule's source
groups hold no peer to connect from. Pure, over one mesh snapshot. `ssh_state` puts the
same causes next to the admin toggle in `meshmgmt peers list`."""

from __future__ import annotations

from meshmgmt.netmap import serves_ssh
from meshmgmt.state import MeshState, PeerRecord, PolicyRecord, RuleRecord

SERVING = "serving"
# Each state in a word or two, for the `meshmgmt peers list` column (the API's `ssh_state`).
STATE_WORDS = {
    SERVING: "serving",
    "ssh-not-served": "not served",
    "no-policy-for-peer": "no policy",
    "policy-disabled": "policy disabled",
    "ssh-toggle-off": "toggle off",
    "no-source-peers": "no source peers",
}


def _groups_of_peer(state: MeshState, peer_id: str) -> set[str]:
    return {g.name for g in state.groups if peer_id in g.peer_ids}


def _rules_to(state: MeshState, peer: PeerRecord) -> list[tuple[PolicyRecord, RuleRecord]]:
    """Every rule, of enabled and disabled policies, whose destinations include the peer."""
    groups = _groups_of_peer(state, peer.id)
    return [(p, r) for p in state.policies for r in p.rules
            if groups & set(r.destinations) or (r.bidirectional and groups & set(r.sources))]


def _opens_ssh(rule: RuleRecord) -> bool:
    return rule.protocol in ("ssh", "all") or (rule.protocol == "tcp" and (not rule.ports or "22" in rule.ports))


def why_ssh_is_off(state: MeshState, peer: PeerRecord) -> tuple[str, str]:
    """(reason code, message) for a peer whose map has SSH off though it allows SSH."""
    rules = [(p, r) for p, r in _rules_to(state, peer) if _opens_ssh(r)]
    if not rules:
        return ("no-policy-for-peer",
                f"no policy grants SSH to {peer.name} (an admin adds one: meshmgmt policies create NAME "
                f"--source GROUP --destination <a group of {peer.name}> --protocol ssh)")
    enabled = [(p, r) for p, r in rules if p.enabled]
    if not enabled:
        names = ", ".join(sorted({p.name for p, _ in rules}))
        return ("policy-disabled",
                f"the policy that grants SSH to {peer.name} is disabled ({names}; an admin turns it on: "
                f"meshmgmt policies enable {sorted({p.name for p, _ in rules})[0]})")
    if all(r.protocol != "ssh" for _, r in enabled) and not peer.ssh_enabled:
        return ("ssh-toggle-off",
                f"{peer.name} is reachable on port 22 but its SSH toggle is off (an admin turns it on: "
                f"meshmgmt peers ssh {peer.name} on)")
    return ("no-source-peers",
            f"the policies that grant SSH to {peer.name} have no peer in their source groups to connect from "
            "(an admin adds your machine's peer to one of them: meshmgmt groups update GROUP --add-peer PEER)")


def ssh_state(state: MeshState, peer: PeerRecord) -> tuple[str, str]:
    """The peer's effective SSH state: (SERVING, "") when its map has SSH on, else the
    reason code and a message naming the fix. The admin toggle is only one of the inputs:
    the peer must advertise --allow-server-ssh, and a policy must grant SSH to it."""
    if not peer.allow_server_ssh:
        return ("ssh-not-served", f"{peer.name} does not serve SSH (start meshsshd there with --allow-server-ssh)")
    if serves_ssh(state, peer.id):
        return SERVING, ""
    reason, message = why_ssh_is_off(state, peer)
    return reason, f"{peer.name} is not SSH-enabled: {message}"


def why_no_grant(state: MeshState, email: str, peer: PeerRecord) -> tuple[str, str]:
    """(reason code, message) for an identity no policy lets reach a peer that serves SSH."""
    user = state.users_by_email.get(email.lower())
    user_groups = {g.name for g in state.groups if user is not None and user.id in g.user_ids}
    mine = [(p, r) for p, r in _rules_to(state, peer)
            if _opens_ssh(r) and (user_groups & set(r.sources) or f"user:{email.lower()}" in r.sources)]
    if any(p.enabled for p, _ in mine):
        return ("no-source-peers",
                f"a policy lets {email} reach {peer.name}, but only from peers in its source groups and "
                "none is there (an admin adds your machine's peer: meshmgmt groups update GROUP --add-peer PEER)")
    if mine:
        names = sorted({p.name for p, _ in mine})
        return ("policy-disabled",
                f"the policy that would let {email} reach {peer.name} is disabled ({', '.join(names)}; an admin "
                f"turns it on: meshmgmt policies enable {names[0]})")
    return ("no-policy", f"no policy lets {email} reach {peer.name}")
