"""meshssh: the client (login, connect, proxy for OpenSSH, cp, fan-out)."""
