"""vLLM-side support: the instrumentor and its plugins, the CPU data-parallel plugin, the tiny local MoE model, the engine harness."""
