"""moeplan.profiler: measures a machine and writes a measured HardwareProfile.

``moeplan profile`` (or ``python -m moeplan.profiler`` under ``torchrun``) times dense matmul,
HBM copy, launch overhead, the SwiGLU expert FFN (loop and grouped kernels), attention prefill and
decode, host-link copies and, with ≥ 2 ranks, the collectives; :mod:`moeplan.profiler.reference`
re-times the headline figures with a plain loop. Modules: ``device`` (the accelerator), ``timing``
(how one op is timed), ``*_ops`` (what is timed), ``collectives``, ``sizes`` (the plans),
``runner`` (the run), ``raw`` (the measurements), ``assemble`` (measurements → profile),
``headline`` (summary rows), ``command`` (the CLI). Importing this package does not import torch.
"""
