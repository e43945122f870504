"""Kernel providers. Each subpackage registers one backend through ``rwkv_zoo_register_backends``."""
