"""The model: loading a LLaVA-1.5 from any of its layouts, how it runs (dtype, attention, quantization), the stage
policy (what trains), and the projector's weights."""
