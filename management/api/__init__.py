"""REST routes of meshmgmt, one module per collection.

    peers.py         peer-facing: register, self-update, sync WebSocket, audit ingest, /api/me/peers
    enrol.py         the registration challenge and proof, re-key approval
    users.py         users and service users          groups.py      groups of peers and users
    setup_keys.py    setup keys                       policies.py    access policies and their rules
    peer_admin.py    admin view of peers              audit.py       the audit log and its follower
    subsystems.py    SSH subsystems per peer/group    signing_keys.py  the issuer's signing keys
    _validate.py     field rules the handlers check and openapi.py states
    _rows.py         what the admin collections share; _auth.py, _lookup.py, keys.py: auth, lookups, app keys
"""
