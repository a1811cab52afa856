"""moe-ep's versions of DeepEP's test helpers (same names and meaning)."""
from . import envs, math, testing  # noqa: F401
