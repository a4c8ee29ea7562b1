"""probing_core: the library behind the probing dashboard. Never imports streamlit."""

__version__ = "0.1.0"
#: Bumped whenever the on-disk layout of store entries changes; part of every store key.
STORE_FORMAT_VERSION = 1
