"""Harnesses, kept out of the runtime packages: `foalnet bench` (the service against this machine's
floor and a naive baseline), `foalnet soak` (valid and hostile traffic, then leak checks), the
hostile-upload corpus, and the generator of real test media they share with the test suite.

Installed by the `bench` extra (`pip install -e .[bench]`); the naive baseline also needs `train`
(torch). Nothing in `service` or `model_export` imports this package.
"""
