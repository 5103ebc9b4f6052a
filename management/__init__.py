"""meshmgmt: the management server (store, OIDC issuer, policies, network maps, audit)."""
