"""Build shim: metadata lives in setup.cfg (the native runtime's build hooks in here later)."""

from setuptools import setup

setup()
