"""The classification path: a pretrained encoder (MiniLM by default) with a sequence-classification head
(``model``, ``train``, ``strategy``), the prompt-template arm on a causal LM (``template``), the short/mid/long
ensemble (``ensemble``), the linear-probe floor (``probe``) and the classifier metrics (``metrics``).

Pure logic: no dagster; torch, transformers, peft and sklearn are imported inside functions.
"""
