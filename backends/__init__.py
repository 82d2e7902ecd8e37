"""Compiler backends of mpm_fx (installed as ``mpm_fx.backends``): thin wrappers that hand the
rewritten graph to Inductor, AOTInductor or torch-tensorrt. They land with issue 4."""
