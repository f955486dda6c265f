"""The sections of tools/gpu_check.py (see its docstring); common.py is their shared contract."""
