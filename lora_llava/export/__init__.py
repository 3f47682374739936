"""Exports: ``lora-llava merge`` (LoRA merged into the unquantized base, llava-hf or original layout, or GGUF for
llama.cpp), streamed safetensors I/O, and the chat template an export ships."""
