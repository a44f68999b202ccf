"""The test lab shared by tests/, bench/ and `make demo`; not installed with nfacct.

- `lab.hosts`: throwaway network namespaces (Lab), nft counter rules (Counters), addresses.
- `lab.roles`: traffic roles, run as processes inside them: `python -m lab.roles ROLE ...`.
- `lab.daemon`: a real `nfacct run --netns NS` daemon, started and stopped (Daemon).
- `lab.demo`: `make demo`.

Importing `lab` itself loads nothing else: the roles run under the system's python3 too.
"""
