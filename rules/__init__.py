"""The ruleset files: one source for `rules/install.sh` (hosts without Python) and for
`nfacct rules install`, which reads them as the package data `nfacct.data` (nfacct/data is a
link to this directory, and the wheel ships its files)."""
