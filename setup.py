"""The one compiled part of Civitas: the ledger's bulk SHA-256 (consent/ledger/_hashing.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built
(no C compiler, no OpenSSL or Python headers) the install goes on and
consent/ledger/hashing.py uses hashlib instead, with the same results.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "consent.ledger._hashing", ["consent/ledger/_hashing.c"],
    libraries=["crypto"], optional=True,
)])
