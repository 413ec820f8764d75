"""Helpers for the tests and the benchmarks, shipped with the package (as ``torch.testing`` is) so that both import
them by name: tiny models built in code (:mod:`.tiny`, :mod:`.tiny_vlm`) and fault injection into a running job
(:mod:`.faults`). The package itself never imports them."""
