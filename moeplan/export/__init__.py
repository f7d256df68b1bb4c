"""Export plans to the runtimes that use them, and import what they run today.

* :mod:`moeplan.export.sglang`: the ``--init-expert-location`` file and the server command;
* :mod:`moeplan.export.eplb`: DeepSeek EPLB tensors (``phy2log``, ``log2phy``, ``logcnt``);
* :mod:`moeplan.export.vllm`: expert-parallel/EPLB flags (vLLM cannot load a placement);
* :mod:`moeplan.export.megatron`: Megatron-Core parallel and MoE arguments (and the
  ``Plan.parallel`` contract);
* :mod:`moeplan.export.importers`: SGLang files, EPLB tensors and SGLang load dumps back in.

Every exporter returns an :class:`moeplan.export.common.Export` (files, command, notes).
"""
