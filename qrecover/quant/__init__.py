"""Quantizers: the uniform grid, the GPTQ solver and the GPTQ v1 bit packing."""
