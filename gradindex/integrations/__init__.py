"""Adapters to other libraries: Hugging Face models as gradindex tasks (:mod:`~gradindex.integrations.hf`), and
stores written during ``transformers.Trainer`` training (:mod:`~gradindex.integrations.hf_callback`).

In: a library's own objects (a ``transformers`` causal LM and its text). Out: a
:class:`~gradindex.task.Task`. Each adapter needs its library (an optional extra) and is
imported only when used.
"""
