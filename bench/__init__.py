"""Benchmarks: meshsshd side by side with OpenSSH's sshd on the same machine (issue 6).

Run `python -m bench` (as root). Pure parts: `bench.stats`; the process edges:
`servers` (throwaway user, both daemons), `transfer`, `measure`, `clients` (asyncssh load
in its own process), `managed` (meshssh and the proxy against a managed peer), `mgmt`
(management figures from `bench/mgmt_bench.py`), `report` (JSON and RESULTS.md).
Nothing in the product imports this package.
"""
