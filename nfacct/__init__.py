"""nfacct: per-process network accounting for Linux, in userspace, over NFQUEUE."""

__version__ = "0.1.0"
